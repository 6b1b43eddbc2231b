"""Backend "cpu": the C++ layer kernels of csrc/cpu/rnn_layer.cpp (torch ops fusedrnn::cpu_rnn_layer*).

fp32 and fp64; fp16/bf16 CPU calls are refused (the dispatcher falls back to the reference, which computes
them in fp32).
"""
from __future__ import annotations

import torch

from .._extension import extension_error, has_extension
from .base import Backend, LayerCall

_DTYPES = (torch.float32, torch.float64)


class CpuBackend(Backend):
    name = "cpu"

    def unavailable_reason(self, device):
        if device.type != "cpu":
            return f"runs on CPU tensors only, got {device.type}"
        if not has_extension():
            return extension_error()
        return None

    def unsupported_reason(self, call: LayerCall):
        if call.dtype not in _DTYPES:
            return f"dtype {call.dtype} not supported (float32, float64 only)"
        return None

    def forward(self, call: LayerCall, need_workspace: bool):
        return torch.ops.fusedrnn.cpu_rnn_layer(
            call.cell, call.x, call.h0, call.c0, call.w_ih, call.w_hh, call.b_ih, call.b_hh, call.w_hr,
            call.lengths, call.reverse, need_workspace)

    def backward(self, call: LayerCall, y, workspace, grad_y, grad_h_n, grad_c_n):
        return torch.ops.fusedrnn.cpu_rnn_layer_backward(
            call.cell, call.x, call.h0, call.c0, call.w_ih, call.w_hh, call.b_ih, call.b_hh, call.w_hr,
            call.lengths, call.reverse, y, workspace, grad_y, grad_h_n, grad_c_n)
