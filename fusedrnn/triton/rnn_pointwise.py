"""Fused gate kernels of the "alternating" path: per step one GEMM for the recurrent term (torch.mm, any
hidden size) and one of these kernels, which adds the biases, applies the activations, updates the state and
stores what backward needs in the shared workspace layout (fusedrnn/backends/base.py).

Grid (B, cdiv(H, BLOCK)): one sequence and BLOCK hidden units of every gate per program. Math in fp32;
the cell state c and the carried gradients stay fp32 between steps, h is kept in the storage dtype because
it is the next GEMM's operand. Every kernel reads its state from one buffer and writes the next state to
another (ping-pong), so running it twice -- as autotuning does -- gives the same result.

Backward convention (per step t, in reverse order of the forward): `mm` = dgh[t_prev] @ W_hh, the GEMM of
the step processed just before (zeros at the first), `gh` = the rest of the carried gradient of the state.
An invalid step passes the carried gradient on unchanged and has zero gate gradients; its GEMM row is then
exactly zero, so `gh + mm` is the carried gradient whichever step came before.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cell_math import configs, sigmoid, tanh

_CONFIGS = [triton.Config({"BLOCK": 128}, num_warps=4), triton.Config({"BLOCK": 512}, num_warps=4)]
CONFIGS = configs(_CONFIGS)


def _tuned(kernel):
    return triton.autotune(CONFIGS, key=["H"])(kernel)


@triton.jit
def _valid(len_ptr, b, t, HAS_LENGTHS: tl.constexpr):
    if HAS_LENGTHS:
        return t < tl.load(len_ptr + b)
    else:
        return t >= 0


@triton.jit
def _prev_valid(len_ptr, b, t, T, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """Step t of sequence b follows the valid step tp (else it started from the initial state)."""
    if REVERSE:
        tp = t + 1
        ok = tp < T
        if HAS_LENGTHS:
            ok = ok & (tp < tl.load(len_ptr + b))
    else:
        tp = t - 1
        ok = t > 0
    return ok, tp


# ---------------------------------------------------------------------------------------------------
# LSTM
# ---------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["t"])
def lstm_pointwise_fwd_kernel(
        xg_ptr,  # [T, B, 4H] x @ W_ih^T
        hg_ptr,  # [B, 4H] h_{t-1} @ W_hh^T
        b_ih_ptr, b_hh_ptr,  # [4H] fp32
        c_prev_ptr, h_prev_ptr,  # [B, H] fp32, [B, H] storage (h_prev: lengths without projection)
        len_ptr,
        ws_ptr,  # out [T, B, WS] (WRITE_WS)
        r_ptr,  # out [B, *] row stride R_STRIDE: r = o * tanh(c) (projection: the GEMM's input)
        c_next_ptr, h_next_ptr, y_ptr,  # out [B, H] fp32, [B, H], [T, B, H] (h, y: without projection)
        t, B, H, WS, R_STRIDE,
        HAS_BIAS: tl.constexpr, HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, WRITE_WS: tl.constexpr,
        BLOCK: tl.constexpr):
    b = tl.program_id(0)
    u = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = u < H
    dt = xg_ptr.dtype.element_ty
    t64 = t.to(tl.int64)
    xg = xg_ptr + (t64 * B + b) * 4 * H + u
    hg = hg_ptr + b * 4 * H + u
    a_i = tl.load(xg, mask=m, other=0.0).to(tl.float32) + tl.load(hg, mask=m, other=0.0).to(tl.float32)
    a_f = tl.load(xg + H, mask=m, other=0.0).to(tl.float32) + tl.load(hg + H, mask=m, other=0.0).to(tl.float32)
    a_g = (tl.load(xg + 2 * H, mask=m, other=0.0).to(tl.float32)
           + tl.load(hg + 2 * H, mask=m, other=0.0).to(tl.float32))
    a_o = (tl.load(xg + 3 * H, mask=m, other=0.0).to(tl.float32)
           + tl.load(hg + 3 * H, mask=m, other=0.0).to(tl.float32))
    if HAS_BIAS:
        a_i += tl.load(b_ih_ptr + u, mask=m, other=0.0) + tl.load(b_hh_ptr + u, mask=m, other=0.0)
        a_f += tl.load(b_ih_ptr + H + u, mask=m, other=0.0) + tl.load(b_hh_ptr + H + u, mask=m, other=0.0)
        a_g += tl.load(b_ih_ptr + 2 * H + u, mask=m, other=0.0) + tl.load(b_hh_ptr + 2 * H + u, mask=m, other=0.0)
        a_o += tl.load(b_ih_ptr + 3 * H + u, mask=m, other=0.0) + tl.load(b_hh_ptr + 3 * H + u, mask=m, other=0.0)
    i = sigmoid(a_i)
    f = sigmoid(a_f)
    g = tanh(a_g)
    o = sigmoid(a_o)
    c_prev = tl.load(c_prev_ptr + b * H + u, mask=m, other=0.0)
    c = f * c_prev + i * g
    r = o * tanh(c)
    if WRITE_WS:
        wsp = ws_ptr + (t64 * B + b) * WS + u
        tl.store(wsp, i.to(dt), mask=m)
        tl.store(wsp + H, f.to(dt), mask=m)
        tl.store(wsp + 2 * H, g.to(dt), mask=m)
        tl.store(wsp + 3 * H, o.to(dt), mask=m)
        tl.store(wsp + 4 * H, c.to(dt), mask=m)
    valid = _valid(len_ptr, b, t, HAS_LENGTHS)
    tl.store(c_next_ptr + b * H + u, tl.where(valid, c, c_prev), mask=m)
    if HAS_PROJ:
        tl.store(r_ptr + b * R_STRIDE + u, r.to(dt), mask=m)
    else:
        h_prev = tl.load(h_prev_ptr + b * H + u, mask=m, other=0.0)
        tl.store(h_next_ptr + b * H + u, tl.where(valid, r.to(dt), h_prev), mask=m)
        tl.store(y_ptr + (t64 * B + b) * H + u, tl.where(valid, r, 0.0).to(dt), mask=m)


@triton.jit(do_not_specialize=["t"])
def lstm_pointwise_bwd_kernel(
        ws_ptr,  # [T, B, WS]
        c0_ptr,  # [B, H]
        gy_ptr,  # [T, B, H] (without projection)
        gr_ptr,  # [B, H] grad of r (projection: computed outside, zero at invalid steps)
        mm_ptr,  # [B, H] dg[t_prev] @ W_hh (without projection)
        gh_in_ptr, gc_in_ptr,  # [B, H] fp32
        len_ptr,
        dg_ptr,  # out [T, B, 4H]
        gh_out_ptr, gc_out_ptr,  # out [B, H] fp32
        t, T, B, H, WS,
        HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    u = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = u < H
    dt = dg_ptr.dtype.element_ty
    t64 = t.to(tl.int64)
    valid = _valid(len_ptr, b, t, HAS_LENGTHS)
    if HAS_PROJ:
        gr = tl.load(gr_ptr + b * H + u, mask=m, other=0.0).to(tl.float32)
    else:
        carried = (tl.load(gh_in_ptr + b * H + u, mask=m, other=0.0)
                   + tl.load(mm_ptr + b * H + u, mask=m, other=0.0).to(tl.float32))
        gr = carried + tl.load(gy_ptr + (t64 * B + b) * H + u, mask=m, other=0.0).to(tl.float32)
        # a valid step hands its state gradient on through its GEMM row; an invalid one passes it as is
        tl.store(gh_out_ptr + b * H + u, tl.where(valid, 0.0, carried), mask=m)
    wsp = ws_ptr + (t64 * B + b) * WS + u
    i = tl.load(wsp, mask=m, other=0.0).to(tl.float32)
    f = tl.load(wsp + H, mask=m, other=0.0).to(tl.float32)
    g = tl.load(wsp + 2 * H, mask=m, other=0.0).to(tl.float32)
    o = tl.load(wsp + 3 * H, mask=m, other=0.0).to(tl.float32)
    c = tl.load(wsp + 4 * H, mask=m, other=0.0).to(tl.float32)
    has_prev, tp = _prev_valid(len_ptr, b, t, T, REVERSE, HAS_LENGTHS)
    c_prev = tl.load(ws_ptr + (tp.to(tl.int64) * B + b) * WS + 4 * H + u, mask=m & has_prev, other=0.0)
    c_prev = tl.where(has_prev, c_prev.to(tl.float32), tl.load(c0_ptr + b * H + u, mask=m, other=0.0).to(tl.float32))
    gc = tl.load(gc_in_ptr + b * H + u, mask=m, other=0.0)
    tanh_c = tanh(c)
    gct = gc + gr * o * (1.0 - tanh_c * tanh_c)
    dgp = dg_ptr + (t64 * B + b) * 4 * H + u
    tl.store(dgp, tl.where(valid, gct * g * i * (1.0 - i), 0.0).to(dt), mask=m)
    tl.store(dgp + H, tl.where(valid, gct * c_prev * f * (1.0 - f), 0.0).to(dt), mask=m)
    tl.store(dgp + 2 * H, tl.where(valid, gct * i * (1.0 - g * g), 0.0).to(dt), mask=m)
    tl.store(dgp + 3 * H, tl.where(valid, gr * tanh_c * o * (1.0 - o), 0.0).to(dt), mask=m)
    tl.store(gc_out_ptr + b * H + u, tl.where(valid, gct * f, gc), mask=m)


# ---------------------------------------------------------------------------------------------------
# GRU
# ---------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["t"])
def gru_pointwise_fwd_kernel(
        xg_ptr,  # [T, B, 3H] x @ W_ih^T
        hg_ptr,  # [B, 3H] h_{t-1} @ W_hh^T
        b_ih_ptr, b_hh_ptr,  # [3H] fp32
        h_prev_ptr,  # [B, H]
        len_ptr,
        ws_ptr,  # out [T, B, 4H]: r, z, n, W_hn h + b_hn (WRITE_WS)
        h_next_ptr, y_ptr,  # out [B, H], [T, B, H]
        t, B, H,
        HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, WRITE_WS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    u = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = u < H
    dt = xg_ptr.dtype.element_ty
    t64 = t.to(tl.int64)
    xg = xg_ptr + (t64 * B + b) * 3 * H + u
    hg = hg_ptr + b * 3 * H + u
    a_r = tl.load(xg, mask=m, other=0.0).to(tl.float32) + tl.load(hg, mask=m, other=0.0).to(tl.float32)
    a_z = tl.load(xg + H, mask=m, other=0.0).to(tl.float32) + tl.load(hg + H, mask=m, other=0.0).to(tl.float32)
    x_n = tl.load(xg + 2 * H, mask=m, other=0.0).to(tl.float32)
    hn = tl.load(hg + 2 * H, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a_r += tl.load(b_ih_ptr + u, mask=m, other=0.0) + tl.load(b_hh_ptr + u, mask=m, other=0.0)
        a_z += tl.load(b_ih_ptr + H + u, mask=m, other=0.0) + tl.load(b_hh_ptr + H + u, mask=m, other=0.0)
        x_n += tl.load(b_ih_ptr + 2 * H + u, mask=m, other=0.0)
        hn += tl.load(b_hh_ptr + 2 * H + u, mask=m, other=0.0)
    r = sigmoid(a_r)
    z = sigmoid(a_z)
    n = tanh(x_n + r * hn)
    h_prev = tl.load(h_prev_ptr + b * H + u, mask=m, other=0.0)
    h = (1.0 - z) * n + z * h_prev.to(tl.float32)
    if WRITE_WS:
        wsp = ws_ptr + (t64 * B + b) * 4 * H + u
        tl.store(wsp, r.to(dt), mask=m)
        tl.store(wsp + H, z.to(dt), mask=m)
        tl.store(wsp + 2 * H, n.to(dt), mask=m)
        tl.store(wsp + 3 * H, hn.to(dt), mask=m)
    valid = _valid(len_ptr, b, t, HAS_LENGTHS)
    tl.store(h_next_ptr + b * H + u, tl.where(valid, h.to(dt), h_prev), mask=m)
    tl.store(y_ptr + (t64 * B + b) * H + u, tl.where(valid, h, 0.0).to(dt), mask=m)


@triton.jit(do_not_specialize=["t"])
def gru_pointwise_bwd_kernel(
        ws_ptr,  # [T, B, 4H]
        y_ptr, h0_ptr,  # previous states
        gy_ptr, mm_ptr,  # [T, B, H], [B, H]
        gh_in_ptr,  # [B, H] fp32
        len_ptr,
        dgx_ptr, dgh_ptr,  # out [T, B, 3H]
        gh_out_ptr,  # out [B, H] fp32
        t, T, B, H,
        HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    u = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = u < H
    dt = dgx_ptr.dtype.element_ty
    t64 = t.to(tl.int64)
    valid = _valid(len_ptr, b, t, HAS_LENGTHS)
    carried = (tl.load(gh_in_ptr + b * H + u, mask=m, other=0.0)
               + tl.load(mm_ptr + b * H + u, mask=m, other=0.0).to(tl.float32))
    go = carried + tl.load(gy_ptr + (t64 * B + b) * H + u, mask=m, other=0.0).to(tl.float32)
    wsp = ws_ptr + (t64 * B + b) * 4 * H + u
    r = tl.load(wsp, mask=m, other=0.0).to(tl.float32)
    z = tl.load(wsp + H, mask=m, other=0.0).to(tl.float32)
    n = tl.load(wsp + 2 * H, mask=m, other=0.0).to(tl.float32)
    hn = tl.load(wsp + 3 * H, mask=m, other=0.0).to(tl.float32)
    has_prev, tp = _prev_valid(len_ptr, b, t, T, REVERSE, HAS_LENGTHS)
    h_prev = tl.load(y_ptr + (tp.to(tl.int64) * B + b) * H + u, mask=m & has_prev, other=0.0)
    h_prev = tl.where(has_prev, h_prev.to(tl.float32), tl.load(h0_ptr + b * H + u, mask=m, other=0.0).to(tl.float32))
    d_n = tl.where(valid, go * (1.0 - z) * (1.0 - n * n), 0.0)
    d_r = d_n * hn * r * (1.0 - r)
    d_z = tl.where(valid, go * (h_prev - n) * z * (1.0 - z), 0.0)
    dxp = dgx_ptr + (t64 * B + b) * 3 * H + u
    tl.store(dxp, d_r.to(dt), mask=m)
    tl.store(dxp + H, d_z.to(dt), mask=m)
    tl.store(dxp + 2 * H, d_n.to(dt), mask=m)
    dhp = dgh_ptr + (t64 * B + b) * 3 * H + u
    tl.store(dhp, d_r.to(dt), mask=m)
    tl.store(dhp + H, d_z.to(dt), mask=m)
    tl.store(dhp + 2 * H, (d_n * r).to(dt), mask=m)
    tl.store(gh_out_ptr + b * H + u, tl.where(valid, go * z, carried), mask=m)


# ---------------------------------------------------------------------------------------------------
# RNN (tanh / relu)
# ---------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["t"])
def rnn_pointwise_fwd_kernel(
        xg_ptr, hg_ptr, b_ih_ptr, b_hh_ptr,  # [T, B, H], [B, H], [H] fp32
        h_prev_ptr, len_ptr,
        h_next_ptr, y_ptr,  # out [B, H], [T, B, H]
        t, B, H,
        RELU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    u = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = u < H
    dt = xg_ptr.dtype.element_ty
    t64 = t.to(tl.int64)
    a = (tl.load(xg_ptr + (t64 * B + b) * H + u, mask=m, other=0.0).to(tl.float32)
         + tl.load(hg_ptr + b * H + u, mask=m, other=0.0).to(tl.float32))
    if HAS_BIAS:
        a += tl.load(b_ih_ptr + u, mask=m, other=0.0) + tl.load(b_hh_ptr + u, mask=m, other=0.0)
    if RELU:
        h = tl.maximum(a, 0.0)
    else:
        h = tanh(a)
    valid = _valid(len_ptr, b, t, HAS_LENGTHS)
    h_prev = tl.load(h_prev_ptr + b * H + u, mask=m, other=0.0)
    tl.store(h_next_ptr + b * H + u, tl.where(valid, h.to(dt), h_prev), mask=m)
    tl.store(y_ptr + (t64 * B + b) * H + u, tl.where(valid, h, 0.0).to(dt), mask=m)


@triton.jit(do_not_specialize=["t"])
def rnn_pointwise_bwd_kernel(
        y_ptr, gy_ptr, mm_ptr,  # [T, B, H], [T, B, H], [B, H]
        gh_in_ptr, len_ptr,
        dg_ptr,  # out [T, B, H]
        gh_out_ptr,  # out [B, H] fp32
        t, B, H,
        RELU: tl.constexpr, HAS_LENGTHS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    u = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = u < H
    dt = dg_ptr.dtype.element_ty
    off = (t.to(tl.int64) * B + b) * H + u
    valid = _valid(len_ptr, b, t, HAS_LENGTHS)
    carried = (tl.load(gh_in_ptr + b * H + u, mask=m, other=0.0)
               + tl.load(mm_ptr + b * H + u, mask=m, other=0.0).to(tl.float32))
    go = carried + tl.load(gy_ptr + off, mask=m, other=0.0).to(tl.float32)
    h = tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
    if RELU:
        d = tl.where(h > 0.0, go, 0.0)
    else:
        d = go * (1.0 - h * h)
    tl.store(dg_ptr + off, tl.where(valid, d, 0.0).to(dt), mask=m)
    tl.store(gh_out_ptr + b * H + u, tl.where(valid, 0.0, carried), mask=m)


_FWD = {"lstm": _tuned(lstm_pointwise_fwd_kernel), "gru": _tuned(gru_pointwise_fwd_kernel),
        "rnn": _tuned(rnn_pointwise_fwd_kernel)}
_BWD = {"lstm": _tuned(lstm_pointwise_bwd_kernel), "gru": _tuned(gru_pointwise_bwd_kernel),
        "rnn": _tuned(rnn_pointwise_bwd_kernel)}


def _grid(B, H):
    return lambda meta: (B, triton.cdiv(H, meta["BLOCK"]))


# ---------------------------------------------------------------------------------------------------
# The alternating time loops
# ---------------------------------------------------------------------------------------------------
def alternating_forward(cell, xg, b_ih, b_hh, h0, c0, w_hh, w_hr, lengths, reverse, need_ws):
    """Per step: hg = h @ W_hh^T (torch.mm), then the fused gate kernel. Same contract as
    rnn_persistent.persistent_forward."""
    T, B, _ = xg.shape
    HO = h0.shape[1]
    H = w_hh.shape[0] // {"lstm": 4, "gru": 3}.get(cell, 1)
    dev, dt = xg.device, xg.dtype
    dummy = torch.empty(1, device=dev, dtype=dt)
    dummy32 = torch.empty(1, device=dev, dtype=torch.float32)
    has_bias = b_ih is not None
    b_ih, b_hh = (b_ih, b_hh) if has_bias else (dummy32, dummy32)
    has_len = lengths is not None
    lens = lengths if has_len else torch.empty(1, device=dev, dtype=torch.int64)
    y = torch.empty(T, B, HO, device=dev, dtype=dt)
    hg = torch.empty(B, w_hh.shape[0], device=dev, dtype=dt)
    h_bufs = [h0, torch.empty(B, HO, device=dev, dtype=dt)]
    if cell != "lstm" or w_hr is None:
        h_bufs.append(torch.empty(B, HO, device=dev, dtype=dt))  # never write into h0
    steps = range(T - 1, -1, -1) if reverse else range(T)
    grid = _grid(B, H)

    if cell == "lstm":
        has_proj = w_hr is not None
        W = (6 if has_proj else 5) * H
        ws = torch.empty(T, B, W, device=dev, dtype=dt) if need_ws else None
        c_bufs = [c0.to(torch.float32, copy=True), torch.empty(B, H, device=dev, dtype=torch.float32)]
        r_scratch = torch.empty(B, H, device=dev, dtype=dt) if has_proj and not need_ws else None
        valid_all = (torch.arange(T, device=dev)[:, None] < lengths[None, :])[..., None] if has_len else None
        h = h0
        for s, t in enumerate(steps):
            torch.mm(h, w_hh.t(), out=hg)
            c_prev, c_next = c_bufs[s % 2], c_bufs[(s + 1) % 2]
            h_next = h_bufs[1 + s % 2] if not has_proj else dummy
            r = ws[t, :, 5 * H:] if has_proj and need_ws else r_scratch
            _FWD["lstm"][grid](xg, hg, b_ih, b_hh, c_prev, h, lens, ws if need_ws else dummy,
                               r if has_proj else dummy, c_next, h_next, y, t, B, H, W, W if need_ws else H,
                               HAS_BIAS=has_bias, HAS_PROJ=has_proj, HAS_LENGTHS=has_len, WRITE_WS=need_ws)
            if has_proj:
                h_new = torch.mm(r, w_hr.t())
                if has_len:
                    y[t] = torch.where(valid_all[t], h_new, 0)
                    h = torch.where(valid_all[t], h_new, h)
                else:
                    y[t] = h_new
                    h = h_new
            else:
                h = h_next
        return y, h, c_bufs[T % 2].to(dt), ws

    if cell == "gru":
        ws = torch.empty(T, B, 4 * H, device=dev, dtype=dt) if need_ws else None
        h = h0
        for s, t in enumerate(steps):
            torch.mm(h, w_hh.t(), out=hg)
            h_next = h_bufs[1 + s % 2]
            _FWD["gru"][grid](xg, hg, b_ih, b_hh, h, lens, ws if need_ws else dummy, h_next, y, t, B, H,
                              HAS_BIAS=has_bias, HAS_LENGTHS=has_len, WRITE_WS=need_ws)
            h = h_next
        return y, h, None, ws

    h = h0
    for s, t in enumerate(steps):
        torch.mm(h, w_hh.t(), out=hg)
        h_next = h_bufs[1 + s % 2]
        _FWD["rnn"][grid](xg, hg, b_ih, b_hh, h, lens, h_next, y, t, B, H,
                          RELU=cell == "rnn_relu", HAS_BIAS=has_bias, HAS_LENGTHS=has_len)
        h = h_next
    return y, h, None, None


def alternating_backward(cell, ws, y, h0, c0, w_hh, w_hr, lengths, reverse, grad_y, grad_h_n, grad_c_n):
    """Per step (reverse order): the fused gate-gradient kernel, then mm = dgh[t] @ W_hh (torch.mm). Same
    contract as rnn_persistent.persistent_backward."""
    T, B, HO = y.shape
    H = w_hh.shape[0] // {"lstm": 4, "gru": 3}.get(cell, 1)
    dev, dt = y.device, y.dtype
    dummy = torch.empty(1, device=dev, dtype=dt)
    has_len = lengths is not None
    lens = lengths if has_len else torch.empty(1, device=dev, dtype=torch.int64)
    steps = range(T) if reverse else range(T - 1, -1, -1)
    grid = _grid(B, H)
    mm = torch.zeros(B, HO, device=dev, dtype=dt)
    # fp32 copies: the kernels write the ping-pong buffers, never an input
    gh = [grad_h_n.to(torch.float32, copy=True), torch.empty(B, HO, device=dev, dtype=torch.float32)]

    if cell == "lstm":
        has_proj = w_hr is not None
        W = ws.shape[2]
        dg = torch.empty(T, B, 4 * H, device=dev, dtype=dt)
        gout = torch.empty(T, B, HO, device=dev, dtype=dt) if has_proj else None
        gc = [grad_c_n.to(torch.float32, copy=True), torch.empty(B, H, device=dev, dtype=torch.float32)]
        valid_all = (torch.arange(T, device=dev)[:, None] < lengths[None, :])[..., None] if has_len else None
        gh_cur = gh[0]
        for s, t in enumerate(steps):
            gr = dummy
            if has_proj:  # the projection's share of the step, in torch: go -> dW_hr input, grad of r
                carried = gh_cur + mm.float()
                go = carried + grad_y[t].float()
                if has_len:
                    go = torch.where(valid_all[t], go, 0)
                    gh_cur = torch.where(valid_all[t], 0, carried)
                else:
                    gh_cur = torch.zeros_like(carried)
                gout[t] = go.to(dt)
                gr = gout[t] @ w_hr
            _BWD["lstm"][grid](ws, c0, grad_y, gr, mm, gh[s % 2], gc[s % 2], lens, dg, gh[(s + 1) % 2],
                               gc[(s + 1) % 2], t, T, B, H, W,
                               HAS_PROJ=has_proj, HAS_LENGTHS=has_len, REVERSE=bool(reverse))
            if not has_proj:
                gh_cur = gh[(s + 1) % 2]
            torch.mm(dg[t], w_hh, out=mm)
        return dg, dg, gout, gh_cur + mm.float(), gc[T % 2]

    if cell == "gru":
        dgx = torch.empty(T, B, 3 * H, device=dev, dtype=dt)
        dgh = torch.empty(T, B, 3 * H, device=dev, dtype=dt)
        for s, t in enumerate(steps):
            _BWD["gru"][grid](ws, y, h0, grad_y, mm, gh[s % 2], lens, dgx, dgh, gh[(s + 1) % 2], t, T, B, H,
                              HAS_LENGTHS=has_len, REVERSE=bool(reverse))
            torch.mm(dgh[t], w_hh, out=mm)
        return dgx, dgh, None, gh[T % 2] + mm.float(), None

    dg = torch.empty(T, B, H, device=dev, dtype=dt)
    for s, t in enumerate(steps):
        _BWD["rnn"][grid](y, grad_y, mm, gh[s % 2], lens, dg, gh[(s + 1) % 2], t, B, H,
                          RELU=cell == "rnn_relu", HAS_LENGTHS=has_len)
        torch.mm(dg[t], w_hh, out=mm)
    return dg, dg, None, gh[T % 2] + mm.float(), None
