"""Does the CUDA emulator (csrc/emu) do what the GPU does? One script for the first GPU (under 2 minutes).

bench/emu_conformance.cu exercises every PTX wrapper of csrc/cuda/ptx.cuh (mma.sync f16/bf16/tf32 with their
fragment layouts, cvt.rna.tf32, ld.acquire, cp.async + wait, prefetch), the warp collectives and a 4-CTA cluster
with distributed shared memory. It is built twice -- nvcc for the local GPU, g++ with the emulator -- and run on
the same inputs; outputs are compared bit for bit wherever the hardware is exact:

    mma *-exact    small integers: every product and sum exact, so any fragment-layout error shows as a wrong bit
    mma *-random   random operands: the tensor core's internal rounding is not specified; reported (max ulp), and
                   must stay within 2 ulp of the fp32 result
    cvt-tf32       4096 values incl. ties, subnormals, inf, NaN, the largest finite: bit exact
    memory, warp, cluster                                                                         bit exact

Without a GPU it runs the emulator half and checks it against an independent Python encoding of the PTX ISA's
fragment layouts (a second reading of the ISA, so a typo in one of the two shows).

    python bench/emu_conformance.py              # GPU + emulator when a GPU is there, else the emulator only
    python bench/emu_conformance.py --emu-only
"""
from __future__ import annotations

import argparse
import ctypes
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "bench" / "emu_conformance.cu"
K_IN = K_OUT = 8192
CHECKS = ["mma_f16", "mma_bf16", "mma_tf32", "cvt_tf32", "memory", "warp", "cluster"]


def cuda_home() -> str:
    return os.environ.get("CUDA_HOME", "/usr/local/cuda")


def cuda_include() -> str:
    inc = os.path.join(cuda_home(), "include")
    if os.path.exists(os.path.join(inc, "cuda_runtime.h")):
        return inc
    import nvidia
    return os.path.join(list(nvidia.__path__)[0], "cu13", "include")


def build_emu(out: Path) -> Path:
    lib = out / "libconf_emu.so"
    boost = ["-lboost_context"] if Path("/usr/include/boost/context/detail/fcontext.hpp").exists() else ["-DFUSEDRNN_EMU_UCONTEXT"]
    cmd = ["g++", "-std=c++20", "-O2", "-shared", "-fPIC", "-x", "c++", "-DFUSEDRNN_EMU", "-Wno-unknown-pragmas",
           f"-I{ROOT / 'csrc' / 'emu' / 'include'}", f"-I{ROOT / 'csrc'}", f"-I{cuda_include()}", str(SOURCE),
           "-x", "none", str(ROOT / "csrc" / "emu" / "emu.cpp"), "-o", str(lib), "-pthread", "-Wl,-Bsymbolic", *boost]
    subprocess.run(cmd, check=True)
    return lib


def build_gpu(out: Path, arch: str) -> Path:
    lib = out / "libconf_gpu.so"
    cmd = [os.path.join(cuda_home(), "bin", "nvcc"), "-std=c++20", "-O2", "-shared", "-Xcompiler", "-fPIC",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}",
           str(SOURCE), "-o", str(lib), "-cudart", "shared"]
    subprocess.run(cmd, check=True)
    return lib


def run(lib: ctypes.CDLL, name: str, inp: np.ndarray) -> np.ndarray:
    out = np.zeros(K_OUT, dtype=np.uint32)
    fn = getattr(lib, f"conf_{name}")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    err = fn(inp.ctypes.data, out.ctypes.data)
    if err != 0:
        raise RuntimeError(f"conf_{name}: CUDA error {err}")
    return out


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------
def f2u(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def half_bits(v: np.ndarray, kind: str) -> np.ndarray:
    if kind == "f16":
        return np.asarray(v, dtype=np.float16).view(np.uint16).astype(np.uint32)
    return (f2u(v) >> 16).astype(np.uint32)  # bf16: exact for the values used (<= 8 significant bits)


def mma_inputs(kind: str, exact: bool, rng) -> np.ndarray:
    """Per-lane registers filled with operand values; small integers (exact) or random normals."""
    inp = np.zeros(K_IN, dtype=np.uint32)
    n = 6 * 32
    if kind == "tf32":
        vals = rng.integers(-8, 9, n).astype(np.float32) if exact else rng.standard_normal(n).astype(np.float32)
        inp[:n] = f2u(vals) & 0xFFFFE000
    else:
        lo = rng.integers(-8, 9, n) if exact else rng.standard_normal(n)
        hi = rng.integers(-8, 9, n) if exact else rng.standard_normal(n)
        inp[:n] = half_bits(lo, kind) | (half_bits(hi, kind) << 16)
    c = rng.integers(-64, 65, 128).astype(np.float32) if exact else rng.standard_normal(128).astype(np.float32)
    inp[192:320] = f2u(c)
    return inp


def special_floats(rng) -> np.ndarray:
    base = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 3.4028235e38, -3.4028235e38,
            1e-45, -1e-45, 1.1754942e-38, 1.1754944e-38]
    # exact ties of the 13-bit rounding: mantissa ...1000000000000 (0x1000), both signs, and near ties
    ties = [struct.unpack("<f", struct.pack("<I", 0x3F800000 | m))[0] for m in (0x1000, 0x3000, 0xFFF, 0x1001, 0x7FF000)]
    vals = np.array(base + ties + [-t for t in ties], dtype=np.float32)
    rest = (rng.standard_normal(4096 - len(vals)) * 10.0 ** rng.integers(-30, 30, 4096 - len(vals))).astype(np.float32)
    inp = np.zeros(K_IN, dtype=np.uint32)
    inp[:4096] = f2u(np.concatenate([vals, rest]))
    return inp


def make_inputs(rng) -> dict:
    inputs = {}
    for kind in ("f16", "bf16", "tf32"):
        inputs[f"mma_{kind}-exact"] = mma_inputs(kind, True, rng)
        inputs[f"mma_{kind}-random"] = mma_inputs(kind, False, rng)
    inputs["cvt_tf32"] = special_floats(rng)
    for name in ("memory", "warp", "cluster"):
        inputs[name] = rng.integers(0, 2 ** 32, K_IN, dtype=np.uint64).astype(np.uint32)
    return inputs


# ---------------------------------------------------------------------------------------------------------
# The PTX ISA's fragment layouts, encoded independently of csrc/emu/emu.cpp
# ---------------------------------------------------------------------------------------------------------
def unpack_operand(reg: int, half: int, kind: str) -> float:
    if kind == "tf32":
        return float(np.array([reg & 0xFFFFE000], dtype=np.uint32).view(np.float32)[0])
    bits = (reg >> (16 * half)) & 0xFFFF
    if kind == "f16":
        return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])
    return float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])


def mma_reference(inp: np.ndarray, kind: str) -> np.ndarray:
    """D = A B + C in float64 from the ISA's tables ("Matrix Fragments for mma.m16n8k16 / m16n8k8")."""
    K = 8 if kind == "tf32" else 16
    A = np.zeros((16, K))
    B = np.zeros((K, 8))
    C = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        regs = [int(r) for r in inp[lane * 6:lane * 6 + 6]]
        if kind == "tf32":
            for i, (row, col) in enumerate([(g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)]):
                A[row, col] = unpack_operand(regs[i], 0, kind)
            B[t, g] = unpack_operand(regs[4], 0, kind)
            B[t + 4, g] = unpack_operand(regs[5], 0, kind)
        else:
            for i, (row, col0) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
                A[row, col0] = unpack_operand(regs[i], 0, kind)
                A[row, col0 + 1] = unpack_operand(regs[i], 1, kind)
            for i, k0 in enumerate([2 * t, 2 * t + 8]):
                B[k0, g] = unpack_operand(regs[4 + i], 0, kind)
                B[k0 + 1, g] = unpack_operand(regs[4 + i], 1, kind)
        cvals = inp[192 + lane * 4:192 + lane * 4 + 4].view(np.float32)
        C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1] = cvals
    D = A @ B + C
    out = np.zeros(128, dtype=np.float32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        out[lane * 4:lane * 4 + 4] = [D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]]
    return out


def cvt_reference(inp: np.ndarray) -> np.ndarray:
    u = inp[:4096].astype(np.uint64)
    special = (u & 0x7F800000) == 0x7F800000
    rounded = ((u + 0x1000) & 0xFFFFE000) & 0xFFFFFFFF
    return np.where(special, u, rounded).astype(np.uint32)


def memory_reference(inp: np.ndarray) -> np.ndarray:
    return inp[:1024][::-1] ^ inp[:1024]


def warp_reference(inp: np.ndarray) -> np.ndarray:
    out = np.zeros(512, dtype=np.uint32)
    for warp in range(2):
        v = inp[warp * 32:warp * 32 + 32].astype(np.uint64)
        w = (v << 32) | inp[64:96].astype(np.uint64)
        src = int(inp[128 + warp]) % 32
        ballot = sum(int(v[lane] & 1) << lane for lane in range(32))
        total = int(sum(int(x) & 0xFFFF for x in v)) & 0xFFFFFFFF
        for lane in range(32):
            up = w[lane - 3] if lane >= 3 else w[lane]
            o = out[warp * 256 + lane * 8:warp * 256 + lane * 8 + 8]
            o[:] = [v[src], v[lane ^ 5], up & 0xFFFFFFFF, up >> 32, ballot, int((v == 0x12345678).any()), total,
                    v[lane ^ 17] & 0x3FFFFFFF]
    return out


def cluster_reference(inp: np.ndarray) -> np.ndarray:
    out = np.zeros(2048, dtype=np.uint32)
    for cta in range(8):
        left = (cta % 4 + 3) % 4  # the CTA of the cluster that writes into this one
        out[cta * 256:cta * 256 + 256] = (inp[left * 256:left * 256 + 256].astype(np.uint64) + left).astype(np.uint32)
    return out


def ulp_diff(a: np.ndarray, b: np.ndarray) -> int:
    ai, bi = a.view(np.int32).astype(np.int64), b.view(np.int32).astype(np.int64)
    ai = np.where(ai < 0, -(ai & 0x7FFFFFFF), ai)
    bi = np.where(bi < 0, -(bi & 0x7FFFFFFF), bi)
    return int(np.abs(ai - bi).max())


def words(name: str) -> int:
    return {"mma": 128, "cvt_tf32": 4096, "memory": 1024, "warp": 512, "cluster": 2048}[name.split("_")[0] if name.startswith("mma") else name]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="CUDA emulator vs GPU, bit for bit")
    ap.add_argument("--emu-only", action="store_true")
    ap.add_argument("--arch", default=None, help="GPU arch for nvcc, e.g. 90a (default: the local GPU's)")
    args = ap.parse_args(argv)
    start = time.time()
    gpu = None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        emu = ctypes.CDLL(str(build_emu(out)))
        if not args.emu_only:
            try:
                import torch
                if torch.cuda.is_available():
                    major, minor = torch.cuda.get_device_capability()
                    arch = args.arch or (f"{major}{minor}a" if major >= 9 else f"{major}{minor}")
                    gpu = ctypes.CDLL(str(build_gpu(out, arch)))
            except ImportError:
                pass
        rng = np.random.default_rng(0)
        inputs = make_inputs(rng)
        failures = []
        print(f"{'check':18} {'emulator vs ISA/python':28} {'emulator vs GPU':28}")
        for key, inp in inputs.items():
            name = key.split("-")[0]
            if name == "cluster" and gpu is not None and torch.cuda.get_device_capability()[0] < 9:
                continue
            n = words(name)
            e = run(emu, name, inp)[:n]
            # the emulator against the independent Python encoding
            if name.startswith("mma"):
                ref = mma_reference(inp, name.split("_")[1])
                exact = key.endswith("exact")
                u = ulp_diff(e.view(np.float32), ref)
                ok = (u == 0) if exact else (u <= 2)
                vs_ref = f"{'bit-exact' if u == 0 else f'{u} ulp'}"
            elif name == "cvt_tf32":
                ok = np.array_equal(e, cvt_reference(inp))
                vs_ref = "bit-exact" if ok else f"{int((e != cvt_reference(inp)).sum())} differ"
            else:
                ref = {"memory": memory_reference, "warp": warp_reference, "cluster": cluster_reference}[name](inp)
                ok = np.array_equal(e, ref)
                vs_ref = "bit-exact" if ok else f"{int((e != ref).sum())} of {n} words differ"
            if not ok:
                failures.append(f"{key}: emulator vs ISA reference: {vs_ref}")
            vs_gpu = "(no GPU)"
            if gpu is not None:
                gout = run(gpu, name, inp)[:n]
                if key.endswith("random"):
                    u = ulp_diff(e.view(np.float32), gout.view(np.float32))
                    vs_gpu = f"{u} ulp (rounding not specified)"
                    if u > 2:
                        failures.append(f"{key}: emulator vs GPU {u} ulp")
                else:
                    same = np.array_equal(e, gout)
                    vs_gpu = "bit-exact" if same else f"{int((e != gout).sum())} of {n} words differ"
                    if not same:
                        failures.append(f"{key}: emulator vs GPU: {vs_gpu}")
            print(f"{key:18} {vs_ref:28} {vs_gpu:28}")
        print(f"{'PASS' if not failures else 'FAIL'} in {time.time() - start:.1f} s" +
              ("" if not failures else ":\n  " + "\n  ".join(failures)))
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
