"""Row kernels of fusedrnn::rnn_layer_ext (backends.ext) on backends "cuda" and "cuda-emu".

    CudaRows     csrc/cuda/rnn_ext.cu on CUDA tensors: ops fusedrnn::cuda_ext_forward_rows, cuda_ext_backward_rows
    CudaEmuRows  the same kernels and op code built as host C++ and run on CPU tensors by the CUDA emulator
                 (csrc/emu; ops fusedrnn::cuda_emu_ext_*): how they are tested without a GPU

Each provider has the contract of backends.ext (its module doc; ReferenceRows is the same in PyTorch ops) and the
ReferenceRows signatures. float32, float16 and bfloat16 (computed in float32); float64 is refused. One CTA per
batch row; any hidden size (the row cache moves from shared to global memory when it does not fit the device).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._extension import emulated_cuda_error, has_emulated_cuda
from ..reference import EXT_CELLS, GATES

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_ROW = 2 ** 31 - 1  # elements of one [G*H] row (the kernels index a row with 32-bit integers)


def _missing_ops(prefix: str) -> Optional[str]:
    if not hasattr(torch.ops.fusedrnn, f"{prefix}ext_forward_rows"):
        return (f"the extension was built without the rnn_layer_ext row kernels (no op "
                f"fusedrnn::{prefix}ext_forward_rows); rebuild it from this source tree")
    return None


def _unsupported_reason(cell: str, dtype: torch.dtype, hidden_size: int) -> Optional[str]:
    if cell not in EXT_CELLS:
        return f"cell {cell!r} has no LayerNorm / zoneout kernels ({', '.join(EXT_CELLS)} only)"
    if dtype not in _DTYPES:
        return f"dtype {dtype} not supported (float32, float16, bfloat16 only)"
    if GATES[cell] * hidden_size > _MAX_ROW:
        return f"hidden_size {hidden_size} too large: a row of {GATES[cell]} x hidden_size must stay under 2^31"
    return None


class CudaRows:
    """The CUDA row kernels on CUDA tensors (module doc)."""

    name = "cuda"
    ops = "cuda_"  # prefix of the torch ops: fusedrnn::cuda_ext_forward_rows, ...

    @staticmethod
    def unavailable_reason(device) -> Optional[str]:
        from .cuda import CudaBackend
        return CudaBackend().unavailable_reason(torch.device(device)) or _missing_ops("cuda_")

    @staticmethod
    def unsupported_reason(cell, dtype, hidden_size) -> Optional[str]:
        return _unsupported_reason(cell, dtype, hidden_size)

    @classmethod
    def forward_rows(cls, cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev, zoneout_h,
                     zoneout_c, valid):
        return getattr(torch.ops.fusedrnn, f"{cls.ops}ext_forward_rows")(
            cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev, zoneout_h, zoneout_c, valid)

    @classmethod
    def backward_rows(cls, cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev, zoneout_h,
                      zoneout_c, valid, grad_h, grad_y, grad_c, acc):
        return getattr(torch.ops.fusedrnn, f"{cls.ops}ext_backward_rows")(
            cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev, zoneout_h, zoneout_c, valid,
            grad_h, grad_y, grad_c, acc)


class CudaEmuRows(CudaRows):
    """The CUDA row kernels emulated on CPU tensors (module doc). Slow: for tests and development only."""

    name = "cuda-emu"
    ops = "cuda_emu_"

    @staticmethod
    def unavailable_reason(device) -> Optional[str]:
        device = torch.device(device)
        if device.type != "cpu":
            return f"runs on CPU tensors only (the CUDA kernels, emulated on the CPU), got {device.type}"
        if not has_emulated_cuda():
            return emulated_cuda_error()
        return _missing_ops("cuda_emu_")
