"""Backend "reference": the spec's time loop in PyTorch ops, with the workspace and an explicit BPTT backward.

Structure shared by every fast backend: the input projection x @ W_ih^T for all steps is one GEMM before
the loop; each step does one GEMM h @ W_hh^T and the pointwise cell math; backward runs the loop in reverse
for the gate gradients only, then dx, dW_ih, dW_hh and the biases are one GEMM / reduction each.
Half inputs are computed in fp32. Runs on any device PyTorch runs on, and on empty problems (B=0, H=0).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import _compute_dtype
from .base import Backend, LayerCall, previous_states, valid_mask, workspace_width


# ---------------------------------------------------------------------------------------------------
# Pointwise cell math of one step (the Python twin of csrc/fusedrnn/cell_math.h).
# pre: gate pre-activations [B, G*H] without the recurrent part of GRU's n gate.
# ---------------------------------------------------------------------------------------------------
def lstm_pointwise_forward(pre: Tensor, c_prev: Tensor):
    """pre [B,4H] -> (activated gates [B,4H], c [B,H], r = o * tanh(c) [B,H])."""
    i, f, g, o = pre.chunk(4, -1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c_prev + i * g
    r = o * torch.tanh(c)
    return torch.cat([i, f, g, o], -1), c, r


def lstm_pointwise_backward(gates: Tensor, c: Tensor, c_prev: Tensor, grad_r: Tensor, grad_c: Tensor):
    """Returns (grad of the pre-activations [B,4H], grad of c_prev [B,H])."""
    i, f, g, o = gates.chunk(4, -1)
    tanh_c = torch.tanh(c)
    grad_c = grad_c + grad_r * o * (1 - tanh_c * tanh_c)
    grad_pre = torch.cat([grad_c * g * i * (1 - i), grad_c * c_prev * f * (1 - f),
                          grad_c * i * (1 - g * g), grad_r * tanh_c * o * (1 - o)], -1)
    return grad_pre, grad_c * f


def gru_pointwise_forward(x_gates: Tensor, h_gates: Tensor, h_prev: Tensor):
    """x_gates = W_ih x + b_ih, h_gates = W_hh h + b_hh, both [B,3H] -> (saved [B,4H], h [B,H])."""
    x_r, x_z, x_n = x_gates.chunk(3, -1)
    h_r, h_z, h_n = h_gates.chunk(3, -1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return torch.cat([r, z, n, h_n], -1), (1 - z) * n + z * h_prev


def gru_pointwise_backward(saved: Tensor, h_prev: Tensor, grad_h: Tensor):
    """Returns (grad of x_gates [B,3H], grad of h_gates [B,3H], direct grad of h_prev [B,H])."""
    r, z, n, h_n = saved.chunk(4, -1)
    grad_n_pre = grad_h * (1 - z) * (1 - n * n)
    grad_r_pre = grad_n_pre * h_n * r * (1 - r)
    grad_z_pre = grad_h * (h_prev - n) * z * (1 - z)
    grad_x_gates = torch.cat([grad_r_pre, grad_z_pre, grad_n_pre], -1)
    grad_h_gates = torch.cat([grad_r_pre, grad_z_pre, grad_n_pre * r], -1)
    return grad_x_gates, grad_h_gates, grad_h * z


def rnn_pointwise_backward(cell: str, h: Tensor, grad_h: Tensor):
    """Grad of the pre-activation from the output h = act(pre)."""
    if cell == "rnn_tanh":
        return grad_h * (1 - h * h)
    return grad_h * (h > 0).to(h.dtype)


def _addmm_bias(x2d: Tensor, w: Tensor, b: Optional[Tensor]):
    return x2d @ w.t() if b is None else torch.addmm(b, x2d, w.t())


class ReferenceBackend(Backend):
    """Every step is out of place (lists of per-step tensors, stacked once): the forward and the backward are
    plain differentiable PyTorch, so they also run under vmap (is_grads_batched) and, composed, give exact
    second derivatives (see fusedrnn.ops.differentiable_backward)."""

    name = "reference"

    def unavailable_reason(self, device):
        return None

    def forward(self, call: LayerCall, need_workspace: bool):
        cell, T, B, H = call.cell, call.seq_len, call.batch_size, call.hidden_size
        out_dtype = call.dtype
        cdt = _compute_dtype(out_dtype)
        up = lambda t: None if t is None else t.to(cdt)  # noqa: E731
        x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr = map(
            up, (call.x, call.h0, call.c0, call.w_ih, call.w_hh, call.b_ih, call.b_hh, call.w_hr))
        mask = valid_mask(T, call.lengths, x.device)

        # one GEMM for all steps; explicit sizes, not -1: a reshape cannot infer a size from 0 elements (B=0)
        x_gates = _addmm_bias(x.reshape(T * B, x.shape[-1]), w_ih, b_ih).reshape(T, B, w_ih.shape[0])
        ys, saved_steps = [None] * T, [None] * T

        for t in (range(T - 1, -1, -1) if call.reverse else range(T)):
            h_gates = _addmm_bias(h, w_hh, b_hh)
            if cell == "lstm":
                gates, c_new, r = lstm_pointwise_forward(x_gates[t] + h_gates, c)
                h_new = r @ w_hr.t() if w_hr is not None else r
                saved = [gates, c_new] + ([r] if w_hr is not None else [])
            elif cell == "gru":
                saved_gru, h_new = gru_pointwise_forward(x_gates[t], h_gates, h)
                saved = [saved_gru]
            else:
                pre = x_gates[t] + h_gates
                h_new = torch.tanh(pre) if cell == "rnn_tanh" else torch.relu(pre)
                saved = []
            if need_workspace and saved:
                saved_steps[t] = torch.cat(saved, -1)
            if mask is not None:  # an invalid step keeps the state and writes zeros
                valid = mask[t]
                ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
                h = torch.where(valid, h_new, h)
                if cell == "lstm":
                    c = torch.where(valid, c_new, c)
            else:
                ys[t] = h = h_new
                if cell == "lstm":
                    c = c_new

        y = torch.stack(ys) if T > 0 else x.new_zeros(0, B, h.shape[-1])
        width = workspace_width(cell, H, w_hr is not None)
        if need_workspace and width > 0 and T > 0:
            workspace = torch.stack(saved_steps)
        elif need_workspace:
            workspace = x.new_zeros(T, B, width)
        else:
            workspace = None
        c_n = c.to(out_dtype) if cell == "lstm" else call.x.new_empty(0)
        ws = workspace.to(out_dtype) if workspace is not None else call.x.new_empty(0)
        return y.to(out_dtype), h.to(out_dtype), c_n, ws

    def backward(self, call: LayerCall, y, workspace, grad_y, grad_h_n, grad_c_n):
        cell, T, B, H = call.cell, call.seq_len, call.batch_size, call.hidden_size
        out_dtype = call.dtype
        cdt = _compute_dtype(out_dtype)
        up = lambda t: None if t is None else t.to(cdt)  # noqa: E731
        x, h0, c0, w_ih, w_hh, w_hr = map(up, (call.x, call.h0, call.c0, call.w_ih, call.w_hh, call.w_hr))
        y, workspace, grad_y, grad_h, grad_c = map(up, (y, workspace, grad_y, grad_h_n, grad_c_n))
        mask = valid_mask(T, call.lengths, x.device)
        h_prev_all = previous_states(y, h0, call.reverse, call.lengths)
        if cell == "lstm":
            c_all = workspace[..., 4 * H:5 * H]
            c_prev_all = previous_states(c_all, c0, call.reverse, call.lengths)
        if grad_c is None and cell == "lstm":
            grad_c = torch.zeros_like(c0)

        grad_x_steps, grad_h_steps = [None] * T, [None] * T
        grad_w_hr = torch.zeros_like(w_hr) if w_hr is not None else None

        for t in (range(T) if call.reverse else range(T - 1, -1, -1)):
            grad_out = grad_h + grad_y[t]
            grad_c_in = grad_c
            if mask is not None:  # an invalid step did nothing: no gate gradients, the state passes through
                valid = mask[t]
                grad_out = torch.where(valid, grad_out, torch.zeros_like(grad_out))
                if cell == "lstm":
                    grad_c_in = torch.where(valid, grad_c, torch.zeros_like(grad_c))
            if cell == "lstm":
                gates, c_t = workspace[t, :, :4 * H], workspace[t, :, 4 * H:5 * H]
                grad_r = grad_out
                if w_hr is not None:
                    r_t = workspace[t, :, 5 * H:]
                    grad_r = grad_out @ w_hr
                    grad_w_hr = grad_w_hr + grad_out.t() @ r_t
                grad_pre, grad_c_prev = lstm_pointwise_backward(gates, c_t, c_prev_all[t], grad_r, grad_c_in)
                grad_xg = grad_hg = grad_pre
            elif cell == "gru":
                grad_xg, grad_hg, grad_h_direct = gru_pointwise_backward(workspace[t], h_prev_all[t], grad_out)
            else:
                grad_xg = grad_hg = rnn_pointwise_backward(cell, y[t], grad_out)
            grad_x_steps[t], grad_h_steps[t] = grad_xg, grad_hg
            grad_h_prev = grad_hg @ w_hh
            if cell == "gru":
                grad_h_prev = grad_h_prev + grad_h_direct
            if mask is not None:
                grad_h = torch.where(valid, grad_h_prev, grad_h)
                if cell == "lstm":
                    grad_c = torch.where(valid, grad_c_prev, grad_c)
            else:
                grad_h = grad_h_prev
                if cell == "lstm":
                    grad_c = grad_c_prev

        # Everything that does not feed the recurrence: one GEMM or reduction each over all steps.
        G_H = w_ih.shape[0]
        gx2 = torch.stack(grad_x_steps).reshape(T * B, G_H) if T > 0 else x.new_zeros(0, G_H)
        gh2 = torch.stack(grad_h_steps).reshape(T * B, G_H) if T > 0 else x.new_zeros(0, G_H)
        grad_x = (gx2 @ w_ih).reshape(T, B, w_ih.shape[1])
        grad_w_ih = gx2.t() @ x.reshape(T * B, x.shape[-1])
        grad_w_hh = gh2.t() @ h_prev_all.reshape(T * B, h_prev_all.shape[-1])
        has_bias = call.b_ih is not None
        grad_b_ih = gx2.sum(0) if has_bias else None
        grad_b_hh = gh2.sum(0) if has_bias else None
        out = (grad_x, grad_h, grad_c if cell == "lstm" else None, grad_w_ih, grad_w_hh,
               grad_b_ih, grad_b_hh, grad_w_hr)
        return tuple(call.x.new_empty(0) if g is None else g.to(out_dtype) for g in out)
