"""Backend "cuda": the CUDA C++ kernels of csrc/cuda (torch ops fusedrnn::cuda_rnn_layer, ..._backward).

Three paths run one layer, one direction (csrc/cuda/rnn_kernels.h describes them):

    alternating  per step a cuBLAS GEMM for W_hh h and ONE fused pointwise kernel; every cell, dtype and
                 feature (projection included), any size
    persistent   one cooperative launch for all T steps: W_hh split across CTAs in shared memory, tensor-core
                 MMA, h (or the gate gradients) exchanged every step through L2 and a grid barrier
    cluster      the same on sm_90 thread-block clusters: h exchanged through distributed shared memory with a
                 cluster barrier, one cluster per batch group; for hidden sizes whose W_hh fits one cluster

The persistent paths take fp16/bf16, and fp32 only on TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32);
no projection. What a path can take (shared memory per CTA, co-residency of the grid, cluster support) is asked
of the extension (fusedrnn::cuda_rnn_path_reason), which answers with a reason.

Path choice, per call and direction: FUSEDRNN_CUDA_PATH=alternating|persistent|cluster forces one path; a call
the forced path cannot run (forward or backward) is then refused with the path's reason, so the dispatcher's
"auto" falls back to the next backend and a named backend raises BackendUnsupportedError. Unset (or "auto"),
`candidate_paths` below orders the paths by the latency model (backends/cuda_latency.py) and the first that
can run the call is taken; alternating runs everything.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .._extension import extension_error, has_cuda_kernels, has_extension
from ..reference import GATES
from .base import Backend, LayerCall, empty_problem_reason, scoped_environ

PATHS = ("alternating", "persistent", "cluster")
PATH_ENV = "FUSEDRNN_CUDA_PATH"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The choice, until GPU measurements replace it: the latency model of fusedrnn/backends/cuda_latency.py orders
# the paths by estimated time (launch + T steps) from the planner's real layout and Hopper's constants; the
# first that can run the call is taken. One rule stays outside the model:
#   T <= SHORT_SEQUENCE   alternating: below 3 steps the launch costs decide, and they are the model's least
#                         certain terms (a persistent launch loads all of W_hh into shared memory once, which
#                         one or two steps do not repay; the cells run with T = 1)
# Without the planner (no extension) the order is the fixed one of FALLBACK_ORDER.
SHORT_SEQUENCE = 2
FALLBACK_ORDER = ("cluster", "persistent", "alternating")


def candidate_paths(call: LayerCall, direction: str = "forward") -> tuple[str, ...]:
    """The paths to try for `call`, best first; the first that can run it is taken."""
    if call.seq_len <= SHORT_SEQUENCE:
        return ("alternating",)
    from . import cuda_latency
    try:
        return cuda_latency.paths_by_model(call.cell, call.hidden_size, call.batch_size, call.seq_len, call.dtype,
                                           direction)
    except RuntimeError:  # no planner to ask
        return FALLBACK_ORDER


def forced_path() -> Optional[str]:
    """The path named by $FUSEDRNN_CUDA_PATH, or None for the heuristic."""
    value = os.environ.get(PATH_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in PATHS:
        raise ValueError(f"{PATH_ENV}: expected 'auto' or one of {list(PATHS)}, got {value!r}")
    return value


@functools.lru_cache(maxsize=4096)
def _path_reason(ops: str, path: str, direction: str, cell: str, dtype: torch.dtype, batch: int, hidden: int,
                 proj: bool, allow_tf32: bool, device: torch.device) -> str:
    # Occupancy depends only on the compiled kernels and the device, so the answer is fixed per key.
    return getattr(torch.ops.fusedrnn, f"{ops}rnn_path_reason")(path, direction, cell, dtype, batch, hidden, proj,
                                                                allow_tf32, device)


def path_reason(call: LayerCall, path: str, direction: str, ops: str = "cuda_") -> Optional[str]:
    """None when `path` can run the `direction` ("forward" | "backward") of `call`, else why not. `ops`: the op
    prefix, "cuda_" (CUDA tensors) or "cuda_emu_" (backend cuda-emu: the same planner and limits of an H100)."""
    device = call.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    why = _path_reason(ops, path, direction, call.cell, call.dtype, call.batch_size, call.hidden_size,
                       call.w_hr is not None, bool(torch.backends.cuda.matmul.allow_tf32), device)
    return why or None


def choose_path(call: LayerCall, direction: str, ops: str = "cuda_") -> str:
    """The path that runs the `direction` of `call`: the forced one, else the heuristic's first that can."""
    path = forced_path()
    if path is not None:
        return path
    for path in candidate_paths(call, direction):
        if path_reason(call, path, direction, ops) is None:
            return path
    return "alternating"


INT32_MAX = 2**31 - 1


def int32_reason(call: LayerCall) -> Optional[str]:
    """Why the sizes of `call` do not fit the kernels' parameter structs, or None. T, B, H (and the step t) are
    int fields there (csrc/cuda/rnn_kernels.h); every offset the kernels compute from them is int64."""
    sizes = {"T": call.seq_len, "B": call.batch_size, "H": call.hidden_size, "H_out": call.output_size}
    for name, value in sizes.items():
        if value > INT32_MAX:
            return (f"{name}={value}: the CUDA kernels take {name} as a 32-bit int (at most {INT32_MAX}); "
                    "the cpu backend indexes in int64")
    return None


class CudaBackend(Backend):
    name = "cuda"
    ops = "cuda_"  # prefix of its torch ops: fusedrnn::cuda_rnn_layer, ...

    def unavailable_reason(self, device):
        if device.type != "cuda":
            return f"runs on CUDA tensors only, got {device.type}"
        if not has_extension():
            return extension_error()
        if not has_cuda_kernels():
            return ("the fusedrnn extension was built without its CUDA kernels (no CUDA toolkit found at build "
                    "time); rebuild with CUDA_HOME set, e.g. CUDA_HOME=/usr/local/cuda FUSEDRNN_BUILD_CUDA=1 "
                    "pip install --no-build-isolation -e .")
        return None

    def unsupported_reason(self, call: LayerCall):
        if call.dtype not in _DTYPES:
            return f"dtype {call.dtype} not supported (float32, float16, bfloat16 only)"
        narrow = int32_reason(call)
        if narrow is not None:
            return narrow
        empty = empty_problem_reason(call)
        if empty is not None:
            return empty
        path = forced_path()
        if path is None:
            return None
        for direction in ("forward", "backward"):
            why = path_reason(call, path, direction, self.ops)
            if why is not None:
                return f"{PATH_ENV}={path}: {why}"
        return None

    def choose_path(self, call: LayerCall, direction: str) -> str:
        return choose_path(call, direction, self.ops)

    def forward(self, call: LayerCall, need_workspace: bool):
        return getattr(torch.ops.fusedrnn, f"{self.ops}rnn_layer")(
            call.cell, call.x, call.h0, call.c0, call.w_ih, call.w_hh, call.b_ih, call.b_hh, call.w_hr,
            call.lengths, call.reverse, need_workspace, self.choose_path(call, "forward"))

    def backward(self, call: LayerCall, y, workspace, grad_y, grad_h_n, grad_c_n):
        return getattr(torch.ops.fusedrnn, f"{self.ops}rnn_layer_backward")(
            call.cell, call.x, call.h0, call.c0, call.w_ih, call.w_hh, call.b_ih, call.b_hh, call.w_hr,
            call.lengths, call.reverse, y, workspace, grad_y, grad_h_n, grad_c_n, self.choose_path(call, "backward"))


# ---------------------------------------------------------------------------------------------------------
# bench/sanitizer_cases.py hook: every path forced, so compute-sanitizer sees each kernel whatever the heuristic
# prefers on the machine (its own layer cases run the heuristic only).
# ---------------------------------------------------------------------------------------------------------
def _forced(path: str):
    return scoped_environ({"FUSEDRNN_BACKEND": "cuda", PATH_ENV: path})  # autograd's thread reads the environment


def _sanitizer_run(device, path: str, cell: str, H: int) -> None:
    from .. import functional
    T, B, I, G = 5, 11, 7, GATES[cell]
    g = torch.Generator().manual_seed(0)

    def param(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).to(device=device, dtype=torch.float16).requires_grad_()

    args = dict(x=param(T, B, I), h0=param(B, H), c0=param(B, H) if cell == "lstm" else None, w_ih=param(G * H, I),
                w_hh=param(G * H, H), b_ih=param(G * H), b_hh=param(G * H), reverse=True,
                lengths=torch.tensor([5, 3, 0, 1, 5, 2, 4, 5, 1, 3, 5], device=device))
    with _forced(path):
        y, h, c = functional.rnn_layer(cell, **args)
        (y.float().sum() + h.float().sum() + (c.float().sum() if c is not None else 0)).backward()


def sanitizer_cases(device):
    """(name, callable) pairs: each path that can run here, each cell, fp16, reverse with lengths (a zero one),
    forward and backward; H=40 (one CTA / cluster of one) and H=200 (many CTAs, clusters of several)."""
    device = torch.device(device)
    if CudaBackend().unavailable_reason(device) is not None:
        return []
    cases = []
    for path in PATHS:
        for cell in GATES:
            for H in (40, 200):
                x = torch.empty(5, 11, 7, device=device, dtype=torch.float16)
                w = torch.empty(GATES[cell] * H, H, device=device, dtype=torch.float16)
                h0 = torch.empty(11, H, device=device, dtype=torch.float16)
                call = LayerCall(cell, x, h0, h0 if cell == "lstm" else None, w, w, None, None, None, None, True)
                if all(path_reason(call, path, d) is None for d in ("forward", "backward")):
                    cases.append((f"{path} {cell} fp16 T5-B11-H{H} reverse lengths",
                                  functools.partial(_sanitizer_run, device, path, cell, H)))
    return cases
