"""Per-element gate math and the shared helpers of the Triton kernels (twin of csrc/fusedrnn/cell_math.h).

Everything here computes in fp32; callers convert loads to fp32 and round once when storing.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

# The kernels are decorated once, at import: under TRITON_INTERPRET=1 they are interpreter functions.
INTERPRET = bool(knobs.runtime.interpret)


def configs(full: list) -> list:
    """Autotune configs: the short list on a GPU; only the first in the interpreter, where benchmarking a
    config means running it on the CPU (and `do_bench` needs CUDA events)."""
    return full[:1] if INTERPRET else full


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # exp of a non-positive argument only: no overflow, no cancellation near 0 beyond ~1 ulp of 1.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def mm(a, b, acc, DOT_FP32: tl.constexpr):
    """acc + a @ b with fp32 accumulation. a, b are in the storage dtype (fp16/bf16 run on tensor cores).
    DOT_FP32 (interpreter only): Triton 3.8's interpreter returns garbage for tl.dot on bf16 operands (max
    error ~1e10 on a 16x16 product), so operands are widened first; a product of two fp16/bf16 numbers is
    exact in fp32, so only the summation order differs from the tensor cores.
    fp32 operands use "tf32x3" (three TF32 products on split operands, ~fp32 accuracy): plain TF32 keeps 10
    mantissa bits, far outside the fp32 tolerance, and "ieee" (FMA) spilled thousands of bytes on sm_90
    (LSTM H=63: 7.7 KB of stack, 68 s to compile) where tf32x3 compiles to wgmma without spills."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def grid_barrier(counter_ptr, target):
    """Waits until `target` arrivals were counted at counter_ptr (one arrival per program and step).
    Only for grids whose programs are all resident at once. The interpreter runs programs one after
    another: there a program can only wait for itself, unless concurrent_interpreter.concurrent_programs()
    runs each program in a thread (the backend starts a wider barrier grid under the interpreter only then)."""
    # Every thread's stores of this step are issued before the release; Triton issues a scalar atomic from
    # one thread (a predicated atom.release / ld.acquire in the PTX, checked by tests/test_triton_static.py)
    # and broadcasts the polled value through shared memory.
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
