"""fusedrnn::rnn_layer_ext -- LayerNorm LSTM / GRU and zoneout (spec: fusedrnn.reference.rnn_layer_ext).

One driver for every backend, and per backend two fused row kernels:

    forward   ax = x W_ih^T for all steps (one GEMM); per step: ah = h W_hh^T (one GEMM), then ONE
              ext_forward_rows launch does everything pointwise of the step for all B rows: both layer
              norms (row reductions over G*H), biases, gates, the cell state and its norm, zoneout, lengths.
    backward  per step: ONE ext_backward_rows launch recomputes the row's forward from the workspace and
              writes the gradients of ax and ah (through both norms), the direct gradients of h_{t-1} and
              c_{t-1}, and adds the row's bias / norm-gain gradients to a [B, P] accumulator (each row owns
              its line: no atomics); then grad h_{t-1} += d_ah W_hh (one GEMM). After the loop dx, dW_ih and
              dW_hh are one GEMM each, over all steps.

Why no persistent kernel: the norms reduce over the whole G*H row every step, which a persistent kernel would
pay with a second grid-wide barrier per step; the stepwise form keeps the row in one program.

Row kernels, one per backend, same contract ("reference": ReferenceRows below, in PyTorch ops):

    ext_forward_rows(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev,
                     zoneout_h, zoneout_c, valid) -> (h_new [B,H], c_new [B,H] or [0], y [B,H])
    ext_backward_rows(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev,
                      zoneout_h, zoneout_c, valid, grad_h, grad_y, grad_c, acc)
                      -> (d_ax [B,GH], d_ah [B,GH], grad_h_prev [B,H], grad_c_prev [B,H] or [0])

    ax, ah       [B, G*H] x.dtype: W_ih x_t and W_hh h_{t-1}, no bias; unit stride along G*H, any row stride
                 (the driver passes slices of the workspace, whose rows are W apart)
    b_*, ln_*    [G*H] (ln_c_*: [H]) x.dtype or None; b_ih/b_hh both or neither, ln_ih/ln_hh both or
                 neither, ln_c_weight/ln_c_bias both or neither and only for an LSTM with ln_ih (functional
                 guarantees all three; the row kernels may rely on them)
    h_prev, c_prev  [B, H] x.dtype (c_prev None for GRU)
    zoneout_*    [B, H] x.dtype keep-masks of this step (nonzero: keep the previous value) or None
    valid        [B] bool (step t < lengths[b]) or None (all valid). An invalid row keeps its state
                 (h_new = h_prev, c_new = c_prev), writes y = 0, passes grad_h/grad_c through unchanged,
                 writes d_ax = d_ah = 0 and adds nothing to acc.
    grad_h       [B, H] acc dtype: gradient reaching h_t from later steps (and h_n); grad_y [B, H] x.dtype:
                 gradient of y[t] (counts only on valid rows); grad_c [B, H] acc dtype (LSTM) or None
    acc          [B, P] acc dtype (float32 for half inputs, else x.dtype), mutated: += this row's gradients
                 of, in column blocks: b_ih [GH], b_hh [GH], ln_ih [GH], ln_hh [GH], and for LSTM
                 ln_c_weight [H], ln_c_bias [H]  (P = 4*GH (+2H)); blocks of absent parameters are left as
                 they are
    outputs      h_new, c_new, y, d_ax, d_ah in x.dtype; grad_h_prev, grad_c_prev in the acc dtype
                 (grad_h_prev excludes the d_ah W_hh term, which the driver adds)

Computation in float32 for half inputs, else in x.dtype; norms with biased variance, eps
reference.LN_EPS; every value recomputed in the backward as the forward computed it.

Workspace [T, B, W] x.dtype, W = 2*GH (+H for LSTM): ax | ah | c_t (the LSTM's state after zoneout; rows of
invalid steps hold c_prev). h_{t-1} is read back from y as in the other ops (backends.base.previous_states).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import GATES, LN_EPS
from .base import previous_states


def ext_workspace_width(cell: str, hidden_size: int) -> int:
    G = GATES[cell]
    return 2 * G * hidden_size + (hidden_size if cell == "lstm" else 0)


def ext_acc_width(cell: str, hidden_size: int) -> int:
    return 4 * GATES[cell] * hidden_size + (2 * hidden_size if cell == "lstm" else 0)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------------------------------------------------
# The row kernels in PyTorch ops: backend "reference" of this op, and the contract the fused ones meet.
# ---------------------------------------------------------------------------------------------------------
def _norm(v: Tensor):
    """(normalised v, 1/std) over the last dimension."""
    mean = v.mean(-1, keepdim=True)
    centred = v - mean
    rstd = torch.rsqrt((centred * centred).mean(-1, keepdim=True) + LN_EPS)
    return centred * rstd, rstd


def _norm_backward(grad_out: Tensor, normed: Tensor, rstd: Tensor) -> Tensor:
    """Gradient of the input of _norm from the gradient of its output."""
    return rstd * (grad_out - grad_out.mean(-1, keepdim=True) - normed * (grad_out * normed).mean(-1, keepdim=True))


class _Row:
    """The recomputed forward of one step for all rows, in the compute dtype."""

    def __init__(self, cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev):
        cdt = acc_dtype(ax.dtype)
        up = lambda t: None if t is None else t.to(cdt)  # noqa: E731
        ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev = map(
            up, (ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev))
        self.cell, self.h_prev, self.c_prev = cell, h_prev, c_prev
        self.ln_ih, self.ln_hh, self.ln_c_weight = ln_ih, ln_hh, ln_c_weight
        if ln_ih is not None:
            self.nx, self.rstd_x = _norm(ax)
            self.nh, self.rstd_h = _norm(ah)
            px, ph = self.nx * ln_ih, self.nh * ln_hh
        else:
            px, ph = ax, ah
        if b_ih is not None:
            px, ph = px + b_ih, ph + b_hh
        self.ph = ph
        if cell == "lstm":
            i, f, g, o = (px + ph).chunk(4, dim=-1)
            self.i, self.f, self.g, self.o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            self.c = self.f * c_prev + self.i * self.g
            if ln_c_weight is not None:
                self.nc, self.rstd_c = _norm(self.c)
                self.tanh_c = torch.tanh(self.nc * ln_c_weight + ln_c_bias)
            else:
                self.tanh_c = torch.tanh(self.c)
            self.h = self.o * self.tanh_c
        else:
            x_r, x_z, x_n = px.chunk(3, dim=-1)
            h_r, h_z, h_n = ph.chunk(3, dim=-1)
            self.r = torch.sigmoid(x_r + h_r)
            self.z = torch.sigmoid(x_z + h_z)
            self.n = torch.tanh(x_n + self.r * h_n)
            self.h_n = h_n
            self.h = (1 - self.z) * self.n + self.z * h_prev


def _keep(mask: Optional[Tensor], new: Tensor, previous: Tensor) -> Tensor:
    return new if mask is None else torch.where(mask != 0, previous, new)


def _zoned(mask: Optional[Tensor], grad: Tensor):
    """(gradient of the new value, gradient of the previous one) through zoneout's select."""
    if mask is None:
        return grad, torch.zeros_like(grad)
    keep = mask != 0
    return torch.where(keep, 0, grad), torch.where(keep, grad, 0)


class ReferenceRows:
    """The row kernels in PyTorch ops (module doc)."""

    name = "reference"

    @staticmethod
    def unavailable_reason(device) -> Optional[str]:
        return None  # PyTorch ops: any device

    @staticmethod
    def unsupported_reason(cell, dtype, hidden_size) -> Optional[str]:
        return None

    @staticmethod
    def forward_rows(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev, zoneout_h,
                     zoneout_c, valid):
        row = _Row(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev)
        dt = ax.dtype
        h_new = _keep(zoneout_h, row.h, row.h_prev)
        c_new = _keep(zoneout_c, row.c, row.c_prev) if cell == "lstm" else None
        y = h_new
        if valid is not None:
            v = valid.unsqueeze(-1)
            h_new = torch.where(v, h_new, row.h_prev)
            y = torch.where(v, y, 0)
            if c_new is not None:
                c_new = torch.where(v, c_new, row.c_prev)
        empty = ax.new_empty(0)
        return h_new.to(dt), (empty if c_new is None else c_new.to(dt)), y.to(dt)

    @staticmethod
    def backward_rows(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev, zoneout_h,
                      zoneout_c, valid, grad_h, grad_y, grad_c, acc):
        row = _Row(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev)
        cdt = acc.dtype
        H = h_prev.shape[-1]
        GH = ax.shape[-1]
        grad_out = grad_h + grad_y.to(cdt)  # total gradient of h_t (grad_y counts on valid rows only)
        d_h, grad_h_prev = _zoned(zoneout_h, grad_out)
        P = {}  # parameter-gradient blocks of this step, [B, n] each
        if cell == "lstm":
            d_c_state, grad_c_prev = _zoned(zoneout_c, grad_c)
            d_o = d_h * row.tanh_c
            d_cout = d_h * row.o * (1 - row.tanh_c * row.tanh_c)  # gradient of LN(c)*w + b (or of c)
            if ln_c_weight is not None:
                P["ln_c_weight"], P["ln_c_bias"] = d_cout * row.nc, d_cout
                d_c = d_c_state + _norm_backward(d_cout * row.ln_c_weight, row.nc, row.rstd_c)
            else:
                d_c = d_c_state + d_cout
            d_pre = torch.cat([d_c * row.g * row.i * (1 - row.i), d_c * row.c_prev * row.f * (1 - row.f),
                               d_c * row.i * (1 - row.g * row.g), d_o * row.o * (1 - row.o)], -1)
            grad_c_prev = grad_c_prev + d_c * row.f
            d_px = d_ph = d_pre
        else:
            d_n = d_h * (1 - row.z) * (1 - row.n * row.n)
            d_z = d_h * (row.h_prev - row.n) * row.z * (1 - row.z)
            d_r = d_n * row.h_n * row.r * (1 - row.r)
            d_px = torch.cat([d_r, d_z, d_n], -1)
            d_ph = torch.cat([d_r, d_z, d_n * row.r], -1)
            grad_h_prev = grad_h_prev + d_h * row.z
            grad_c_prev = None
        P["b_ih"], P["b_hh"] = d_px, d_ph
        if ln_ih is not None:
            P["ln_ih"], P["ln_hh"] = d_px * row.nx, d_ph * row.nh
            d_ax = _norm_backward(d_px * row.ln_ih, row.nx, row.rstd_x)
            d_ah = _norm_backward(d_ph * row.ln_hh, row.nh, row.rstd_h)
        else:
            d_ax, d_ah = d_px, d_ph
        if valid is not None:
            v = valid.unsqueeze(-1)
            d_ax, d_ah = torch.where(v, d_ax, 0), torch.where(v, d_ah, 0)
            grad_h_prev = torch.where(v, grad_h_prev, grad_h)
            if grad_c_prev is not None:
                grad_c_prev = torch.where(v, grad_c_prev, grad_c)
            P = {k: torch.where(v, p, 0) for k, p in P.items()}
        offsets = {"b_ih": 0, "b_hh": GH, "ln_ih": 2 * GH, "ln_hh": 3 * GH, "ln_c_weight": 4 * GH,
                   "ln_c_bias": 4 * GH + H}
        present = {"b_ih": b_ih, "b_hh": b_hh, "ln_ih": ln_ih, "ln_hh": ln_hh, "ln_c_weight": ln_c_weight,
                   "ln_c_bias": ln_c_bias}
        for k, p in P.items():
            if present[k] is not None:
                acc[:, offsets[k]:offsets[k] + p.shape[-1]] += p
        dt = ax.dtype
        empty = grad_h.new_empty(0)
        return d_ax.to(dt), d_ah.to(dt), grad_h_prev, (empty if grad_c_prev is None else grad_c_prev)


# ---------------------------------------------------------------------------------------------------------
# The driver (module doc), for any row-kernel provider.
# ---------------------------------------------------------------------------------------------------------
def _step_order(T: int, reverse: bool):
    return range(T - 1, -1, -1) if reverse else range(T)


def _valid_steps(T: int, lengths: Optional[Tensor], device) -> Optional[Tensor]:
    """[T, B] bool or None."""
    if lengths is None:
        return None
    return torch.arange(T, device=device).unsqueeze(1) < lengths.to(device).unsqueeze(0)


def ext_forward(rows, cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, zoneout_h,
                zoneout_c, lengths, reverse, need_workspace):
    """-> (y [T,B,H], h_n [B,H], c_n [B,H] or [0], workspace [T,B,W] or [0])."""
    T, B, I = x.shape
    GH = w_ih.shape[0]
    H = GH // GATES[cell]
    lstm = cell == "lstm"
    workspace = x.new_empty(T, B, ext_workspace_width(cell, H))
    ax_all = workspace[..., :GH]
    ax_all.copy_((x.reshape(T * B, I) @ w_ih.t()).view(T, B, GH))  # the input projection of every step
    valid = _valid_steps(T, lengths, x.device)
    y = x.new_empty(T, B, H)
    h, c = h0, c0
    for t in _step_order(T, reverse):
        ah = h @ w_hh.t()
        h, c_new, y[t] = rows.forward_rows(cell, ax_all[t], ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias,
                                           h, c, None if zoneout_h is None else zoneout_h[t],
                                           None if zoneout_c is None else zoneout_c[t],
                                           None if valid is None else valid[t])
        workspace[t, :, GH:2 * GH] = ah
        if lstm:
            c = c_new
            workspace[t, :, 2 * GH:] = c
    c_n = c if lstm else x.new_empty(0)
    return y, h, c_n, (workspace if need_workspace else x.new_empty(0))


def ext_backward(rows, cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, zoneout_h,
                 zoneout_c, lengths, reverse, y, workspace, grad_y, grad_h_n, grad_c_n):
    """Gradients of (x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias); absent
    inputs get empty tensors."""
    T, B, I = x.shape
    GH = w_ih.shape[0]
    H = GH // GATES[cell]
    lstm = cell == "lstm"
    cdt = acc_dtype(x.dtype)
    h_prev_all = previous_states(y, h0, reverse, lengths)
    c_prev_all = previous_states(workspace[..., 2 * GH:], c0, reverse, lengths) if lstm else None
    valid = _valid_steps(T, lengths, x.device)
    acc = torch.zeros(B, ext_acc_width(cell, H), dtype=cdt, device=x.device)
    d_ax_all = x.new_empty(T, B, GH)
    d_ah_all = x.new_empty(T, B, GH)
    grad_h = grad_h_n.to(cdt)
    grad_c = grad_c_n.to(cdt) if lstm else None
    for t in reversed(_step_order(T, reverse)):
        d_ax_all[t], d_ah_all[t], grad_h_prev, grad_c_prev = rows.backward_rows(
            cell, workspace[t, :, :GH], workspace[t, :, GH:2 * GH], b_ih, b_hh, ln_ih, ln_hh, ln_c_weight,
            ln_c_bias, h_prev_all[t], None if c_prev_all is None else c_prev_all[t],
            None if zoneout_h is None else zoneout_h[t], None if zoneout_c is None else zoneout_c[t],
            None if valid is None else valid[t], grad_h, grad_y[t], grad_c, acc)
        grad_h = grad_h_prev + (d_ah_all[t] @ w_hh).to(cdt)
        grad_c = grad_c_prev if lstm else None
    d_ax_flat = d_ax_all.view(T * B, GH)
    grad_x = (d_ax_flat @ w_ih).view(T, B, I)
    grad_w_ih = d_ax_flat.t() @ x.reshape(T * B, I)
    grad_w_hh = d_ah_all.view(T * B, GH).t() @ h_prev_all.reshape(T * B, H)
    sums = acc.sum(0)
    block = lambda lo, n, t: x.new_empty(0) if t is None else sums[lo:lo + n].to(x.dtype, copy=True)  # noqa: E731
    empty = x.new_empty(0)
    return (grad_x, grad_h.to(x.dtype), grad_c.to(x.dtype) if lstm else empty, grad_w_ih, grad_w_hh,
            block(0, GH, b_ih), block(GH, GH, b_hh), block(2 * GH, GH, ln_ih), block(3 * GH, GH, ln_hh),
            block(4 * GH, H, ln_c_weight), block(4 * GH + H, H, ln_c_bias))


# ---------------------------------------------------------------------------------------------------------
# Row-kernel providers, by backend name. Each: name, unavailable_reason(device), unsupported_reason(cell,
# dtype, hidden_size), forward_rows, backward_rows (module doc). Imported on first use.
# ---------------------------------------------------------------------------------------------------------

_PROVIDERS = {
    "reference": lambda: ReferenceRows,
    "cpu": lambda: __import__("fusedrnn.backends.ext_cpu", fromlist=["CpuRows"]).CpuRows,
    "triton": lambda: __import__("fusedrnn.triton.rnn_ext", fromlist=["TritonRows"]).TritonRows,
    "cuda": lambda: __import__("fusedrnn.backends.ext_cuda", fromlist=["CudaRows"]).CudaRows,
    "cuda-emu": lambda: __import__("fusedrnn.backends.ext_cuda", fromlist=["CudaEmuRows"]).CudaEmuRows,
}


ROW_KERNEL_BACKENDS = tuple(_PROVIDERS)


def row_kernels(name: str):
    """The row-kernel provider of backend `name`, or None when that backend has none."""
    factory = _PROVIDERS.get(name)
    return None if factory is None else factory()
