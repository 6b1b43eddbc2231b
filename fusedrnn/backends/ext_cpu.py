"""Backend "cpu" of fusedrnn::rnn_layer_ext: the fused row kernels of csrc/cpu/rnn_ext.cpp (torch ops
fusedrnn::cpu_ext_forward_rows / cpu_ext_backward_rows), driven by backends.ext.ext_forward / ext_backward.

Their contract is backends/ext.py's module doc (ReferenceRows there computes the same in PyTorch ops). float32
and float64 run natively; float16 / bfloat16 are computed in float32 (the ops widen on entry, acc float32).
"""
from __future__ import annotations

import torch

from .._extension import BUILD_COMMAND, extension_error, has_extension
from ..reference import EXT_CELLS

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _has_ops() -> bool:
    ops = torch.ops.fusedrnn
    return hasattr(ops, "cpu_ext_forward_rows") and hasattr(ops, "cpu_ext_backward_rows")


class CpuRows:
    """The row kernels of backend "cpu" (backends/ext.py module doc)."""

    name = "cpu"

    @staticmethod
    def unavailable_reason(device):
        device = torch.device(device)
        if device.type != "cpu":
            return f"runs on CPU tensors only, got {device.type}"
        if not has_extension():
            return extension_error()
        if not _has_ops():
            return ("the fusedrnn extension was built without the rnn_layer_ext CPU kernels (csrc/cpu/rnn_ext.cpp); "
                    f"rebuild it: {BUILD_COMMAND}")
        return None

    @staticmethod
    def unsupported_reason(cell, dtype, hidden_size):
        if cell not in EXT_CELLS:
            return f"cell {cell!r} not supported ({', '.join(EXT_CELLS)})"
        if dtype not in _DTYPES:
            return f"dtype {dtype} not supported (float32, float64, float16, bfloat16)"
        return None

    @staticmethod
    def forward_rows(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev, zoneout_h,
                     zoneout_c, valid):
        return torch.ops.fusedrnn.cpu_ext_forward_rows(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight,
                                                       ln_c_bias, h_prev, c_prev, zoneout_h, zoneout_c, valid)

    @staticmethod
    def backward_rows(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev, zoneout_h,
                      zoneout_c, valid, grad_h, grad_y, grad_c, acc):
        return torch.ops.fusedrnn.cpu_ext_backward_rows(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight,
                                                        ln_c_bias, h_prev, c_prev, zoneout_h, zoneout_c, valid,
                                                        grad_h, grad_y, grad_c, acc)
