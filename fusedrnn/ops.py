"""Every fusedrnn op, registered with torch.library (namespace `fusedrnn`).

    torch.ops.fusedrnn.rnn_layer           one layer, one direction, forward (+ the workspace for backward)
    torch.ops.fusedrnn.rnn_layer_backward  its explicit BPTT backward

Each op has a fake (meta) implementation, so torch.compile(fullgraph=True) traces through it, and
rnn_layer has registered autograd whose backward is rnn_layer_backward. The real implementation asks the
dispatcher (fusedrnn.backends) which backend runs the call. Arguments are not validated here: use
fusedrnn.functional, which checks them with clear messages.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import LayerCall, select_backend, workspace_width
from .reference import GATES


def _call(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse) -> LayerCall:
    return LayerCall(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)


@torch.library.custom_op("fusedrnn::rnn_layer", mutates_args=())
def rnn_layer(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor], lengths: Optional[Tensor],
              reverse: bool, need_workspace: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y [T,B,H_out], h_n [B,H_out], c_n [B,H] for LSTM else [0], workspace [T,B,W] or [0])."""
    call = _call(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    return select_backend(call, "forward").forward(call, need_workspace)


@rnn_layer.register_fake
def _rnn_layer_fake(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, need_workspace):
    T, B = x.shape[0], x.shape[1]
    H = w_hh.shape[0] // GATES[cell]
    y = x.new_empty(T, B, h0.shape[-1])
    h_n = x.new_empty(B, h0.shape[-1])
    c_n = x.new_empty(B, H) if cell == "lstm" else x.new_empty(0)
    if need_workspace:
        workspace = x.new_empty(T, B, workspace_width(cell, H, w_hr is not None))
    else:
        workspace = x.new_empty(0)
    return y, h_n, c_n, workspace


@torch.library.custom_op("fusedrnn::rnn_layer_backward", mutates_args=())
def rnn_layer_backward(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                       b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor],
                       lengths: Optional[Tensor], reverse: bool, y: Tensor, workspace: Tensor, grad_y: Tensor,
                       grad_h_n: Tensor, grad_c_n: Optional[Tensor]
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns the gradients of (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr); absent inputs get empty tensors."""
    call = _call(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    return select_backend(call, "backward").backward(call, y, workspace, grad_y, grad_h_n, grad_c_n)


@rnn_layer_backward.register_fake
def _rnn_layer_backward_fake(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, y, workspace,
                             grad_y, grad_h_n, grad_c_n):
    like = lambda t: x.new_empty(0) if t is None else torch.empty_like(t)  # noqa: E731
    return (torch.empty_like(x), torch.empty_like(h0), like(c0), torch.empty_like(w_ih), torch.empty_like(w_hh),
            like(b_ih), like(b_hh), like(w_hr))


def _setup_context(ctx, inputs, output):
    cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, need_workspace = inputs
    y, _, _, workspace = output
    ctx.cell, ctx.reverse, ctx.need_workspace = cell, reverse, need_workspace
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, y, workspace)
    ctx.mark_non_differentiable(workspace)


def _rnn_layer_autograd(ctx, grad_y, grad_h_n, grad_c_n, _grad_workspace):
    if not ctx.need_workspace:
        raise RuntimeError(
            "fusedrnn::rnn_layer was called with need_workspace=False, so it cannot be differentiated; "
            "call it through fusedrnn.functional.rnn_layer, which sets it when gradients are needed")
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, y, workspace = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(y)
    if grad_h_n is None:
        grad_h_n = torch.zeros_like(h0)
    if ctx.cell == "lstm" and grad_c_n is None:
        grad_c_n = torch.zeros_like(c0)
    grads = rnn_layer_backward(ctx.cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, ctx.reverse, y,
                               workspace, grad_y, grad_h_n, grad_c_n if ctx.cell == "lstm" else None)
    present = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    gx, gh0, gc0, gw_ih, gw_hh, gb_ih, gb_hh, gw_hr = (g if t is not None else None for g, t in zip(grads, present))
    return None, gx, gh0, gc0, gw_ih, gw_hh, gb_ih, gb_hh, gw_hr, None, None, None


rnn_layer.register_autograd(_rnn_layer_autograd, setup_context=_setup_context)
