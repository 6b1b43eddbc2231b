"""Backend "cuda-emu": the "cuda" backend's kernels and op code, built as host C++ and run on CPU tensors by the
CUDA emulator of csrc/emu (fusedrnn._C_emu; ops fusedrnn::cuda_emu_*).

Everything of backend "cuda" but the hardware: the same path choice (`candidate_paths`, FUSEDRNN_CUDA_PATH forcing
alternating / persistent / cluster), the same planner, with the limits of an H100 (132 SMs, 227 KB of shared memory
per block, clusters of up to 16); every CTA an OS thread, every CUDA thread a fiber, every PTX instruction emulated
with the ISA's semantics (csrc/emu/cuda_emu.h). It is how the CUDA kernels are tested without a GPU and how a
contributor without one develops them. Slow (a grid barrier costs ~0.1-1 ms, an mma.sync ~2 us): never chosen by
"auto", only when named (use_backend("cuda-emu"), FUSEDRNN_BACKEND=cuda-emu).

What it cannot show: speed, occupancy and co-residency on a real GPU, spills and bank conflicts (see
tests/test_cuda_static.py), the GPU's weaker memory model (x86 and the emulator's acq_rel atomics are stronger),
and the tensor cores' exact internal rounding; bench/emu_conformance.py checks the PTX twins against a GPU.
"""
from __future__ import annotations

from .._extension import emulated_cuda_error, has_emulated_cuda
from .cuda import _DTYPES, CudaBackend  # noqa: F401


class CudaEmuBackend(CudaBackend):
    name = "cuda-emu"
    ops = "cuda_emu_"

    def unavailable_reason(self, device):
        if device.type != "cpu":
            return f"runs on CPU tensors only (the CUDA kernels, emulated on the CPU), got {device.type}"
        if not has_emulated_cuda():
            return emulated_cuda_error()
        return None
