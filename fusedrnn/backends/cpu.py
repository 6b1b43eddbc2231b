"""Backend "cpu": the C++ layer kernels of csrc/cpu/rnn_layer.cpp (torch ops fusedrnn::cpu_rnn_layer*).

The kernels run fp32 and fp64. fp16/bf16 calls are computed in fp32, as the spec computes them: their
tensors are widened, the fp32 kernel runs, and what it returns (outputs, workspace, gradients) is rounded
back to the call's dtype. The workspace therefore has the call's dtype, like every other backend's.
"""
from __future__ import annotations

import torch

from .._extension import extension_error, has_extension
from .base import Backend, LayerCall, empty_problem_reason

_KERNEL_DTYPES = (torch.float32, torch.float64)
_WIDENED = (torch.float16, torch.bfloat16)  # computed in fp32


def _to(tensors, dtype):
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]


class CpuBackend(Backend):
    name = "cpu"

    def unavailable_reason(self, device):
        if device.type != "cpu":
            return f"runs on CPU tensors only, got {device.type}"
        if not has_extension():
            return extension_error()
        return None

    def unsupported_reason(self, call: LayerCall):
        if call.dtype not in _KERNEL_DTYPES + _WIDENED:
            return f"dtype {call.dtype} not supported (float16, bfloat16, float32, float64)"
        return empty_problem_reason(call)

    def _layer_args(self, call: LayerCall):
        args = (call.x, call.h0, call.c0, call.w_ih, call.w_hh, call.b_ih, call.b_hh, call.w_hr)
        return _to(args, torch.float32) if call.dtype in _WIDENED else args

    # batch_sizes: call.x is a PackedSequence's data [rows, I] and the states are in its sorted order (the
    # kernel's packed layout, used by the modules' PackedSequence path: fusedrnn.nn).
    def forward(self, call: LayerCall, need_workspace: bool, batch_sizes=None):
        out = torch.ops.fusedrnn.cpu_rnn_layer(call.cell, *self._layer_args(call), call.lengths, call.reverse,
                                               need_workspace, batch_sizes)
        return tuple(_to(out, call.dtype)) if call.dtype in _WIDENED else out

    def backward(self, call: LayerCall, y, workspace, grad_y, grad_h_n, grad_c_n, batch_sizes=None):
        state = (y, workspace, grad_y, grad_h_n, grad_c_n)
        if call.dtype in _WIDENED:
            state = _to(state, torch.float32)
        grads = torch.ops.fusedrnn.cpu_rnn_layer_backward(call.cell, *self._layer_args(call), call.lengths,
                                                          call.reverse, *state, batch_sizes)
        return tuple(_to(grads, call.dtype)) if call.dtype in _WIDENED else grads
