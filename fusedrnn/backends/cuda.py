"""Backend "cuda": the CUDA C++ kernels of csrc/cuda."""
from __future__ import annotations

from .base import Backend


class CudaBackend(Backend):
    name = "cuda"

    def unavailable_reason(self, device):
        if device.type != "cuda":
            return f"runs on CUDA tensors only, got {device.type}"
        return "the CUDA kernels are not written yet (issue: CUDA kernels)"
