"""The fused row kernels of fusedrnn::rnn_layer_ext (LayerNorm LSTM / GRU and zoneout) in Triton, and their
launcher `TritonRows`, the "triton" row-kernel provider of fusedrnn/backends/ext.py.

Contract: the module doc of fusedrnn/backends/ext.py (arguments, shapes, dtypes, the acc layout, invalid
rows); `ReferenceRows` there is the same contract in PyTorch ops and the tests hold these kernels to it.

Grid (B,): one program per batch row. The row's G*H pre-activations are G separate [BLOCK] vectors,
BLOCK = next power of two of H (lanes u >= H are masked and kept at 0 wherever a row sum reads them), so the
layer norms reduce over the whole G*H row and the LSTM's cell-state norm over the H units inside the
program, with no second launch and no atomics. Per-element math as csrc/fusedrnn/cell_math.h
(lstm_state_forward, lstm_output_backward, lstm_state_backward, gru_forward, gru_backward, layer_norm_*,
zoneout), in float32 for fp16 / bf16 / fp32 inputs and float64 for fp64 ones; every absent input (bias,
norms, zoneout masks, valid) is a constexpr flag, so its code is not compiled in.

The backward recomputes the row's forward with the same helpers in the same order, keeping only each norm's
mean and 1/std across the gate gradients: the normed values the norm gradients need are recomputed from the
raw pre-activations (in two passes over the gate blocks), which holds fewer [BLOCK] vectors live
(registers) than keeping them.

Limit: a program holds the whole row. Up to MAX_HIDDEN[element size] hidden units (1024; fp64: 512), with
num_warps(BLOCK) warps, both kernels compile for sm_90 without spills (tests/test_triton_static.py checks the
widest configurations unsupported_reason accepts); beyond it the row no longer fits one program's registers
and unsupported_reason refuses it.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..backends.ext import acc_dtype, ext_acc_width
from ..reference import EXT_CELLS, GATES, LN_EPS
from .cell_math import sigmoid, tanh

_LN_EPS = tl.constexpr(LN_EPS)

# Launch shape: every [BLOCK] vector spread over the warps, LANES_PER_THREAD[element size] lanes per thread
# (fp64 values take two registers each, so half as many), at most MAX_WARPS warps. Compiled for sm_90 the
# backward with every flag on needs ~175 registers per thread at 4 fp32 lanes (~150 at 2 fp64 lanes): fine
# up to 8 warps (255 registers per thread), while 16 warps would cap a thread at 128 (64K registers per SM /
# 512 threads) and it spills. So one program covers at most 32 * MAX_WARPS * lanes hidden units.
# MAX_REGISTERS goes to ptxas as .maxnreg: without a cap ptxas picks a lower register target on its own for
# some of these kernels (96 for the fp16 GRU backward at one warp) and spills a few values to reach it; with
# one it keeps them in registers (112). tests/test_triton_static.py holds every checked configuration to it.
LANES_PER_THREAD = {8: 2, 4: 4, 2: 4}
MAX_WARPS = 8
MAX_HIDDEN = {elem: 32 * MAX_WARPS * lanes for elem, lanes in LANES_PER_THREAD.items()}  # fp64 512, else 1024
MAX_REGISTERS = 240
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def block(hidden_size: int) -> int:
    return triton.next_power_of_2(max(1, hidden_size))


def num_warps(block_h: int, elem: int) -> int:
    """Warps of a program for a [block_h] row of elem-byte inputs (see LANES_PER_THREAD)."""
    return max(1, min(MAX_WARPS, block_h // (32 * LANES_PER_THREAD[elem])))


# ---------------------------------------------------------------------------------------------------------
# Per-element math (cell_math.h) and row helpers. CDT: the compute dtype (float64 for fp64 inputs, else
# float32). Loads are written out in place rather than through a helper: Triton's interpreter pays a few
# milliseconds per helper call, and the tests run these kernels there.
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _row_sum(v0, v1, v2, v3, G: tl.constexpr):
    """Sum over the G vectors of a row: 4 (LSTM gates), 3 (GRU gates: v3 is ignored) or 1 (v0 only). One
    reduction of their lane-wise sum (one cross-warp exchange on the GPU instead of G)."""
    if G == 4:
        v0 = v0 + v1 + v2 + v3
    elif G == 3:
        v0 = v0 + v1 + v2
    return tl.sum(v0, axis=0)


@triton.jit
def layer_norm_stats(v0, v1, v2, v3, m, n, G: tl.constexpr, CDT: tl.constexpr):
    """(mean, rstd) of the row v0..v{G-1} of n values (lanes off m are not counted): mean, then
    rstd = 1/sqrt(mean((v - mean)^2) + eps) from the centred values (two passes, as cell_math.h)."""
    mean = _row_sum(tl.where(m, v0, 0.0), tl.where(m, v1, 0.0), tl.where(m, v2, 0.0), tl.where(m, v3, 0.0), G) / n
    c0 = tl.where(m, v0 - mean, 0.0)
    c1 = tl.where(m, v1 - mean, 0.0)
    c2 = tl.where(m, v2 - mean, 0.0)
    c3 = tl.where(m, v3 - mean, 0.0)
    var = _row_sum(c0 * c0, c1 * c1, c2 * c2, c3 * c3, G) / n
    if CDT == tl.float64:
        rstd = 1.0 / tl.sqrt(var + _LN_EPS)  # (rsqrt of fp64 is rsqrt.approx.f64 on sm_90)
    else:
        rstd = tl.rsqrt(var + _LN_EPS)
    return mean, rstd


@triton.jit
def layer_norm_backward(g, normed, rstd, mean_g, mean_gn):
    """Gradient of v from g = (gradient of the normed output) * gain (cell_math.h)."""
    return rstd * (g - mean_g - normed * mean_gn)


@triton.jit
def zoneout(keep, previous, next):
    """The previous value where the keep-mask is set, else the new one."""
    return tl.where(keep, previous, next)


@triton.jit
def zoneout_backward(keep, grad):
    """(gradient of the new value, gradient of the previous one) through zoneout's select."""
    return tl.where(keep, 0.0, grad), tl.where(keep, grad, 0.0)


@triton.jit
def lstm_state_forward(pre_i, pre_f, pre_g, pre_o, c_prev):
    """The gates and the new cell state (its output r is the caller's: tanh of c or of its norm)."""
    i = sigmoid(pre_i)
    f = sigmoid(pre_f)
    g = tanh(pre_g)
    o = sigmoid(pre_o)
    return i, f, g, o, f * c_prev + i * g


@triton.jit
def lstm_output_backward(o, tanh_n, grad_r):
    """(gradient of pre_o, gradient of n, the argument of the output tanh)."""
    return grad_r * tanh_n * o * (1.0 - o), grad_r * o * (1.0 - tanh_n * tanh_n)


@triton.jit
def lstm_state_backward(i, f, g, c_prev, grad_c_total):
    """(gradients of pre_i, pre_f, pre_g, direct gradient of c_prev) from the whole gradient of c."""
    return (grad_c_total * g * i * (1.0 - i), grad_c_total * c_prev * f * (1.0 - f),
            grad_c_total * i * (1.0 - g * g), grad_c_total * f)


@triton.jit
def gru_forward(pre_r, pre_z, x_n, h_n, h_prev):
    r = sigmoid(pre_r)
    z = sigmoid(pre_z)
    n = tanh(x_n + r * h_n)
    return r, z, n, (1.0 - z) * n + z * h_prev


@triton.jit
def gru_backward(r, z, n, h_n, h_prev, grad_h):
    """(gradients of pre_r, pre_z, x_n, h_n; direct gradient of h_prev)."""
    d_n = grad_h * (1.0 - z) * (1.0 - n * n)
    return d_n * h_n * r * (1.0 - r), grad_h * (h_prev - n) * z * (1.0 - z), d_n, d_n * r, grad_h * z


@triton.jit
def _gate_part(a_row, ln_ptr, b_ptr, u, m, H, G: tl.constexpr, HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr,
               CDT: tl.constexpr):
    """One side of a row's pre-activations (a_row: W_ih x_t or W_hh h_{t-1}): LN(a) * gain + bias, or a + bias,
    as G [BLOCK] vectors (the 4th repeats the 3rd for the GRU), with the norm's mean and rstd (0, 1 without)."""
    a0 = tl.load(a_row + u, mask=m, other=0.0).to(CDT)
    a1 = tl.load(a_row + H + u, mask=m, other=0.0).to(CDT)
    a2 = tl.load(a_row + 2 * H + u, mask=m, other=0.0).to(CDT)
    if G == 4:
        a3 = tl.load(a_row + 3 * H + u, mask=m, other=0.0).to(CDT)
    else:
        a3 = a2
    mean = 0.0
    rstd = 1.0
    if HAS_LN:
        mean, rstd = layer_norm_stats(a0, a1, a2, a3, m, G * H, G, CDT)
        a0 = tl.where(m, a0 - mean, 0.0) * rstd * tl.load(ln_ptr + u, mask=m, other=0.0).to(CDT)
        a1 = tl.where(m, a1 - mean, 0.0) * rstd * tl.load(ln_ptr + H + u, mask=m, other=0.0).to(CDT)
        a2 = tl.where(m, a2 - mean, 0.0) * rstd * tl.load(ln_ptr + 2 * H + u, mask=m, other=0.0).to(CDT)
        if G == 4:
            a3 = tl.where(m, a3 - mean, 0.0) * rstd * tl.load(ln_ptr + 3 * H + u, mask=m, other=0.0).to(CDT)
    if HAS_BIAS:
        a0 += tl.load(b_ptr + u, mask=m, other=0.0).to(CDT)
        a1 += tl.load(b_ptr + H + u, mask=m, other=0.0).to(CDT)
        a2 += tl.load(b_ptr + 2 * H + u, mask=m, other=0.0).to(CDT)
        if G == 4:
            a3 += tl.load(b_ptr + 3 * H + u, mask=m, other=0.0).to(CDT)
    return a0, a1, a2, a3, mean, rstd


@triton.jit
def _lstm_output(c, ln_cw_ptr, ln_cb_ptr, u, m, H, HAS_LN_C: tl.constexpr, CDT: tl.constexpr):
    """(tanh of LN(c) * ln_c_weight + ln_c_bias, or of c; the norm's mean and rstd, 0 and 1 without)."""
    mean = 0.0
    rstd = 1.0
    if HAS_LN_C:
        mean, rstd = layer_norm_stats(c, c, c, c, m, H, 1, CDT)  # the H units of c: one vector
        c = (tl.where(m, c - mean, 0.0) * rstd * tl.load(ln_cw_ptr + u, mask=m, other=0.0).to(CDT)
             + tl.load(ln_cb_ptr + u, mask=m, other=0.0).to(CDT))
    return tanh(c), mean, rstd


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def ext_forward_rows_kernel(
        ax_ptr, ah_ptr,  # [B, G*H], rows ax_stride / ah_stride apart
        b_ih_ptr, b_hh_ptr, ln_ih_ptr, ln_hh_ptr,  # [G*H]
        ln_cw_ptr, ln_cb_ptr,  # [H]
        h_prev_ptr, c_prev_ptr,  # [B, H]
        zh_ptr, zc_ptr,  # [B, H] zoneout keep-masks
        valid_ptr,  # [B] uint8
        h_new_ptr, c_new_ptr, y_ptr,  # out [B, H] contiguous
        H, ax_stride, ah_stride, hp_stride, cp_stride, zh_stride, zc_stride,
        G: tl.constexpr, HAS_LN: tl.constexpr, HAS_LN_C: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_ZONEOUT_H: tl.constexpr, HAS_ZONEOUT_C: tl.constexpr, HAS_VALID: tl.constexpr, FP64: tl.constexpr,
        BLOCK: tl.constexpr):
    CDT = tl.float64 if FP64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    u = tl.arange(0, BLOCK)
    m = u < H
    dt = h_new_ptr.dtype.element_ty
    x0, x1, x2, x3, mean_x, rstd_x = _gate_part(ax_ptr + b * ax_stride, ln_ih_ptr, b_ih_ptr, u, m, H, G, HAS_LN,
                                                HAS_BIAS, CDT)
    p0, p1, p2, p3, mean_h, rstd_h = _gate_part(ah_ptr + b * ah_stride, ln_hh_ptr, b_hh_ptr, u, m, H, G, HAS_LN,
                                                HAS_BIAS, CDT)
    h_prev_raw = tl.load(h_prev_ptr + b * hp_stride + u, mask=m, other=0.0)
    h_prev = h_prev_raw.to(CDT)
    if HAS_VALID:
        valid = tl.load(valid_ptr + b) != 0
    if G == 4:
        c_prev_raw = tl.load(c_prev_ptr + b * cp_stride + u, mask=m, other=0.0)
        c_prev = c_prev_raw.to(CDT)
        i, f, g, o, c = lstm_state_forward(x0 + p0, x1 + p1, x2 + p2, x3 + p3, c_prev)
        tanh_c, mean_c, rstd_c = _lstm_output(c, ln_cw_ptr, ln_cb_ptr, u, m, H, HAS_LN_C, CDT)
        h = o * tanh_c
        if HAS_ZONEOUT_C:
            c = zoneout(tl.load(zc_ptr + b * zc_stride + u, mask=m, other=0) != 0, c_prev, c)
        c_out = c.to(dt)
        if HAS_VALID:
            c_out = tl.where(valid, c_out, c_prev_raw.to(dt))
        tl.store(c_new_ptr + b * H + u, c_out, mask=m)
    else:
        r, z, n, h = gru_forward(x0 + p0, x1 + p1, x2, p2, h_prev)
    if HAS_ZONEOUT_H:
        h = zoneout(tl.load(zh_ptr + b * zh_stride + u, mask=m, other=0) != 0, h_prev, h)
    h_out = h.to(dt)
    y_out = h_out
    if HAS_VALID:
        h_out = tl.where(valid, h_out, h_prev_raw.to(dt))
        y_out = tl.where(valid, y_out, 0.0).to(dt)
    tl.store(h_new_ptr + b * H + u, h_out, mask=m)
    tl.store(y_ptr + b * H + u, y_out, mask=m)


# ---------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _store_state_grad(ptr, u, m, v, passed, valid, HAS_VALID: tl.constexpr):
    """grad_h_prev / grad_c_prev: an invalid row passes the gradient it got (`passed`) on unchanged."""
    if HAS_VALID:
        v = tl.where(valid, v, passed)
    tl.store(ptr + u, v, mask=m)


@triton.jit
def _store_grad(ptr, u, m, v, valid, HAS_VALID: tl.constexpr):
    """A block of d_ax / d_ah: zeros on an invalid row."""
    if HAS_VALID:
        v = tl.where(valid, v, 0.0)
    tl.store(ptr + u, v.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _gain_grad(d, a_ptr, ln_ptr, mean, rstd, u, m, CDT: tl.constexpr):
    """One gate block of a normed side: (g = d * gain, the normed a recomputed as _gate_part computed it)."""
    n = tl.where(m, tl.load(a_ptr + u, mask=m, other=0.0).to(CDT) - mean, 0.0) * rstd
    return tl.where(m, d * tl.load(ln_ptr + u, mask=m, other=0.0).to(CDT), 0.0), n


@triton.jit
def _store_norm_grad(d_ptr, d, a_ptr, ln_ptr, mean, rstd, mean_g, mean_gn, u, m, valid, HAS_VALID: tl.constexpr,
                     CDT: tl.constexpr):
    """One gate block of d_ax / d_ah through the norm (_gain_grad's g and normed, written out: the interpreter
    pays per helper call), zeros on an invalid row."""
    n = tl.where(m, tl.load(a_ptr + u, mask=m, other=0.0).to(CDT) - mean, 0.0) * rstd
    g = tl.where(m, d * tl.load(ln_ptr + u, mask=m, other=0.0).to(CDT), 0.0)
    v = layer_norm_backward(g, n, rstd, mean_g, mean_gn)
    if HAS_VALID:
        v = tl.where(valid, v, 0.0)
    tl.store(d_ptr + u, v.to(d_ptr.dtype.element_ty), mask=m)


@triton.jit
def _side_backward(d0, d1, d2, d3, a_row, ln_ptr, mean, rstd, acc_b, acc_ln, d_row, u, m, am, valid, H,
                   G: tl.constexpr, HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr,
                   CDT: tl.constexpr):
    """One side (x or h) of the gradient: d0..d3 reach its pre-activation part (LN(a) * gain + bias).
    Adds the bias and gain gradients to acc (blocks at acc_b / acc_ln; am: the block's lanes, none on an
    invalid row) and stores the gradient of a to d_row (zeros on an invalid row). With the norm, two passes
    over the gate blocks: the row means of g and g * normed, then the gradients, each pass recomputing g and
    normed so that only one block of them is live at a time (registers)."""
    if HAS_BIAS:
        tl.store(acc_b + u, tl.load(acc_b + u, mask=am, other=0.0) + d0, mask=am)
        tl.store(acc_b + H + u, tl.load(acc_b + H + u, mask=am, other=0.0) + d1, mask=am)
        tl.store(acc_b + 2 * H + u, tl.load(acc_b + 2 * H + u, mask=am, other=0.0) + d2, mask=am)
        if G == 4:
            tl.store(acc_b + 3 * H + u, tl.load(acc_b + 3 * H + u, mask=am, other=0.0) + d3, mask=am)
    if HAS_LN:
        g, n = _gain_grad(d0, a_row, ln_ptr, mean, rstd, u, m, CDT)
        tl.store(acc_ln + u, tl.load(acc_ln + u, mask=am, other=0.0) + d0 * n, mask=am)
        lanes_g = g
        lanes_gn = g * n
        g, n = _gain_grad(d1, a_row + H, ln_ptr + H, mean, rstd, u, m, CDT)
        tl.store(acc_ln + H + u, tl.load(acc_ln + H + u, mask=am, other=0.0) + d1 * n, mask=am)
        lanes_g += g
        lanes_gn += g * n
        g, n = _gain_grad(d2, a_row + 2 * H, ln_ptr + 2 * H, mean, rstd, u, m, CDT)
        tl.store(acc_ln + 2 * H + u, tl.load(acc_ln + 2 * H + u, mask=am, other=0.0) + d2 * n, mask=am)
        lanes_g += g
        lanes_gn += g * n
        if G == 4:
            g, n = _gain_grad(d3, a_row + 3 * H, ln_ptr + 3 * H, mean, rstd, u, m, CDT)
            tl.store(acc_ln + 3 * H + u, tl.load(acc_ln + 3 * H + u, mask=am, other=0.0) + d3 * n, mask=am)
            lanes_g += g
            lanes_gn += g * n
        sum_g = tl.sum(lanes_g, axis=0)
        sum_gn = tl.sum(lanes_gn, axis=0)
        mean_g = sum_g / (G * H)
        mean_gn = sum_gn / (G * H)
        _store_norm_grad(d_row, d0, a_row, ln_ptr, mean, rstd, mean_g, mean_gn, u, m, valid, HAS_VALID, CDT)
        _store_norm_grad(d_row + H, d1, a_row + H, ln_ptr + H, mean, rstd, mean_g, mean_gn, u, m, valid, HAS_VALID,
                         CDT)
        _store_norm_grad(d_row + 2 * H, d2, a_row + 2 * H, ln_ptr + 2 * H, mean, rstd, mean_g, mean_gn, u, m, valid,
                         HAS_VALID, CDT)
        if G == 4:
            _store_norm_grad(d_row + 3 * H, d3, a_row + 3 * H, ln_ptr + 3 * H, mean, rstd, mean_g, mean_gn, u, m,
                             valid, HAS_VALID, CDT)
    else:
        _store_grad(d_row, u, m, d0, valid, HAS_VALID)
        _store_grad(d_row + H, u, m, d1, valid, HAS_VALID)
        _store_grad(d_row + 2 * H, u, m, d2, valid, HAS_VALID)
        if G == 4:
            _store_grad(d_row + 3 * H, u, m, d3, valid, HAS_VALID)


@triton.jit
def ext_backward_rows_kernel(
        ax_ptr, ah_ptr,  # [B, G*H], rows ax_stride / ah_stride apart
        b_ih_ptr, b_hh_ptr, ln_ih_ptr, ln_hh_ptr,  # [G*H]
        ln_cw_ptr, ln_cb_ptr,  # [H]
        h_prev_ptr, c_prev_ptr,  # [B, H]
        zh_ptr, zc_ptr,  # [B, H] zoneout keep-masks
        valid_ptr,  # [B] uint8
        grad_h_ptr, grad_y_ptr, grad_c_ptr,  # [B, H]
        acc_ptr,  # [B, P], rows acc_stride apart: += this row's parameter gradients
        d_ax_ptr, d_ah_ptr,  # out [B, G*H] contiguous
        gh_prev_ptr, gc_prev_ptr,  # out [B, H] contiguous, acc dtype
        H, ax_stride, ah_stride, hp_stride, cp_stride, zh_stride, zc_stride, gh_stride, gy_stride, gc_stride,
        acc_stride,
        G: tl.constexpr, HAS_LN: tl.constexpr, HAS_LN_C: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_ZONEOUT_H: tl.constexpr, HAS_ZONEOUT_C: tl.constexpr, HAS_VALID: tl.constexpr, FP64: tl.constexpr,
        BLOCK: tl.constexpr):
    CDT = tl.float64 if FP64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    u = tl.arange(0, BLOCK)
    m = u < H
    GH = G * H
    ax_row = ax_ptr + b * ax_stride
    ah_row = ah_ptr + b * ah_stride
    # the forward of the row, as ext_forward_rows_kernel computes it
    x0, x1, x2, x3, mean_x, rstd_x = _gate_part(ax_row, ln_ih_ptr, b_ih_ptr, u, m, H, G, HAS_LN, HAS_BIAS, CDT)
    p0, p1, p2, p3, mean_h, rstd_h = _gate_part(ah_row, ln_hh_ptr, b_hh_ptr, u, m, H, G, HAS_LN, HAS_BIAS, CDT)
    if HAS_VALID:
        valid = tl.load(valid_ptr + b) != 0
        am = m & valid  # acc lanes: nothing is added on an invalid row
    else:
        valid = True
        am = m
    acc_row = acc_ptr + b * acc_stride

    grad_h = tl.load(grad_h_ptr + b * gh_stride + u, mask=m, other=0.0).to(CDT)
    grad_out = grad_h + tl.load(grad_y_ptr + b * gy_stride + u, mask=m, other=0.0).to(CDT)  # all of h_t's
    if HAS_ZONEOUT_H:
        d_h, grad_h_prev = zoneout_backward(tl.load(zh_ptr + b * zh_stride + u, mask=m, other=0) != 0, grad_out)
    else:
        d_h = grad_out
        grad_h_prev = tl.zeros_like(grad_out)
    # the direct gradients of h_{t-1} / c_{t-1} are stored before the gate gradients (fewer live registers)
    if G == 4:
        _store_state_grad(gh_prev_ptr + b * H, u, m, grad_h_prev, grad_h, valid, HAS_VALID)
        c_prev = tl.load(c_prev_ptr + b * cp_stride + u, mask=m, other=0.0).to(CDT)
        i, f, g, o, c = lstm_state_forward(x0 + p0, x1 + p1, x2 + p2, x3 + p3, c_prev)
        tanh_c, mean_c, rstd_c = _lstm_output(c, ln_cw_ptr, ln_cb_ptr, u, m, H, HAS_LN_C, CDT)
        grad_c = tl.load(grad_c_ptr + b * gc_stride + u, mask=m, other=0.0).to(CDT)
        if HAS_ZONEOUT_C:
            d_c, grad_c_prev = zoneout_backward(tl.load(zc_ptr + b * zc_stride + u, mask=m, other=0) != 0, grad_c)
        else:
            d_c = grad_c
            grad_c_prev = tl.zeros_like(grad_c)
        d_o, d_n = lstm_output_backward(o, tanh_c, d_h)
        if HAS_LN_C:
            nc = tl.where(m, c - mean_c, 0.0) * rstd_c
            acc_w = acc_row + 4 * GH + u
            tl.store(acc_w, tl.load(acc_w, mask=am, other=0.0) + d_n * nc, mask=am)
            tl.store(acc_w + H, tl.load(acc_w + H, mask=am, other=0.0) + d_n, mask=am)
            gn = tl.where(m, d_n * tl.load(ln_cw_ptr + u, mask=m, other=0.0).to(CDT), 0.0)
            d_c += layer_norm_backward(gn, nc, rstd_c, tl.sum(gn, axis=0) / H, tl.sum(gn * nc, axis=0) / H)
        else:
            d_c += d_n
        d_i, d_f, d_g, d_c_prev = lstm_state_backward(i, f, g, c_prev, d_c)
        _store_state_grad(gc_prev_ptr + b * H, u, m, grad_c_prev + d_c_prev, grad_c, valid, HAS_VALID)
        # both sides get the same pre-activation gradient
        _side_backward(d_i, d_f, d_g, d_o, ax_row, ln_ih_ptr, mean_x, rstd_x, acc_row, acc_row + 2 * GH,
                       d_ax_ptr + b * GH, u, m, am, valid, H, G, HAS_LN, HAS_BIAS, HAS_VALID, CDT)
        _side_backward(d_i, d_f, d_g, d_o, ah_row, ln_hh_ptr, mean_h, rstd_h, acc_row + GH, acc_row + 3 * GH,
                       d_ah_ptr + b * GH, u, m, am, valid, H, G, HAS_LN, HAS_BIAS, HAS_VALID, CDT)
    else:
        h_prev = tl.load(h_prev_ptr + b * hp_stride + u, mask=m, other=0.0).to(CDT)
        r, z, n, h = gru_forward(x0 + p0, x1 + p1, x2, p2, h_prev)
        d_r, d_z, d_n, d_hn, d_h_prev = gru_backward(r, z, n, p2, h_prev, d_h)
        _store_state_grad(gh_prev_ptr + b * H, u, m, grad_h_prev + d_h_prev, grad_h, valid, HAS_VALID)
        _side_backward(d_r, d_z, d_n, d_n, ax_row, ln_ih_ptr, mean_x, rstd_x, acc_row, acc_row + 2 * GH,
                       d_ax_ptr + b * GH, u, m, am, valid, H, G, HAS_LN, HAS_BIAS, HAS_VALID, CDT)
        _side_backward(d_r, d_z, d_hn, d_hn, ah_row, ln_hh_ptr, mean_h, rstd_h, acc_row + GH, acc_row + 3 * GH,
                       d_ah_ptr + b * GH, u, m, am, valid, H, G, HAS_LN, HAS_BIAS, HAS_VALID, CDT)


# ---------------------------------------------------------------------------------------------------------
# Launchers: the row-kernel provider "triton" (fusedrnn/backends/ext.py)
# ---------------------------------------------------------------------------------------------------------
def _rows(t):
    """(tensor whose last dim is unit-stride, its row stride) of a [B, n] argument."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        t = t.contiguous()
    return t, t.stride(0)


def _mask(t):
    """A keep-mask as the kernels load it: bool as uint8 (same bytes), anything else as given."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _vector(t, n, name):
    if t.shape != (n,):
        raise ValueError(f"{name}: expected shape [{n}], got {list(t.shape)}")
    return t.contiguous()


def _common(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev, zoneout_h, zoneout_c,
            valid):
    """Checks the arguments of both kernels; -> (pointer args, stride args, constexprs, B, H, GH)."""
    if cell not in EXT_CELLS:
        raise ValueError(f"rnn_layer_ext row kernels: cell must be one of {EXT_CELLS}, got {cell!r}")
    G = GATES[cell]
    B, H = h_prev.shape
    GH = G * H
    if ax.shape != (B, GH) or ah.shape != (B, GH):
        raise ValueError(f"ax, ah: expected [{B}, {GH}], got {list(ax.shape)}, {list(ah.shape)}")
    if (b_ih is None) != (b_hh is None) or (ln_ih is None) != (ln_hh is None) or \
            (ln_c_weight is None) != (ln_c_bias is None):
        raise ValueError("b_ih/b_hh, ln_ih/ln_hh and ln_c_weight/ln_c_bias come in pairs: both or neither")
    if ln_c_weight is not None and (cell != "lstm" or ln_ih is None):
        raise ValueError("ln_c_weight/ln_c_bias: only for the LSTM with layer norm")
    if cell == "lstm" and c_prev is None:
        raise ValueError("the LSTM needs c_prev")
    dummy = ax
    ax, ax_s = _rows(ax)
    ah, ah_s = _rows(ah)
    h_prev, hp_s = _rows(h_prev)
    c_prev, cp_s = (dummy, 0) if cell != "lstm" else _rows(c_prev)
    zh, zh_s = (dummy, 0) if zoneout_h is None else _rows(_mask(zoneout_h))
    zc, zc_s = (dummy, 0) if zoneout_c is None or cell != "lstm" else _rows(_mask(zoneout_c))
    if valid is not None:
        valid = (valid if valid.dtype == torch.bool else valid != 0).contiguous().view(torch.uint8)
    vec = lambda t, n, name: dummy if t is None else _vector(t, n, name)  # noqa: E731
    ptrs = [ax, ah, vec(b_ih, GH, "b_ih"), vec(b_hh, GH, "b_hh"), vec(ln_ih, GH, "ln_ih"), vec(ln_hh, GH, "ln_hh"),
            vec(ln_c_weight, H, "ln_c_weight"), vec(ln_c_bias, H, "ln_c_bias"), h_prev, c_prev, zh, zc,
            dummy if valid is None else valid]
    strides = [ax_s, ah_s, hp_s, cp_s, zh_s, zc_s]
    BLOCK = block(H)
    consts = dict(G=G, HAS_LN=ln_ih is not None, HAS_LN_C=ln_c_weight is not None, HAS_BIAS=b_ih is not None,
                  HAS_ZONEOUT_H=zoneout_h is not None, HAS_ZONEOUT_C=zoneout_c is not None and cell == "lstm",
                  HAS_VALID=valid is not None, FP64=ax.dtype == torch.float64, BLOCK=BLOCK)
    return ptrs, strides, consts, B, H, GH


def _refuse(cell, ax, H):
    why = TritonRows.unsupported_reason(cell, ax.dtype, H)
    if why is not None:
        raise RuntimeError(f"fusedrnn rnn_layer_ext triton row kernels: {why}")


def _on_device(t):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


class TritonRows:
    """ext_forward_rows / ext_backward_rows (contract: fusedrnn/backends/ext.py) as the two kernels above."""

    name = "triton"

    @staticmethod
    def unavailable_reason(device):
        """The triton backend's rule: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
        from ..backends.triton import TritonBackend
        return TritonBackend().unavailable_reason(torch.device(device))

    @staticmethod
    def unsupported_reason(cell, dtype, hidden_size):
        if cell not in EXT_CELLS:
            return f"the rnn_layer_ext row kernels take cells {list(EXT_CELLS)}, got {cell!r}"
        if dtype not in _DTYPES:
            return (f"the Triton row kernels take fp32, fp16, bf16 and fp64, got "
                    f"{str(dtype).replace('torch.', '')}")
        elem = dtype.itemsize
        limit = MAX_HIDDEN[elem]
        if hidden_size > limit:
            return (f"hidden_size={hidden_size} is over {limit} for {str(dtype).replace('torch.', '')}: one program "
                    f"holds a whole row (the layer norms reduce over all {GATES[cell]}*H pre-activations) and its "
                    f"backward keeps ~45 registers per hidden unit of a thread live; {limit} units already take "
                    f"{MAX_WARPS} warps of {LANES_PER_THREAD[elem]} units per thread (~150-180 registers each on "
                    f"sm_90), and more warps would cap a thread at 128 registers (64K per SM) and spill")
        return None

    @staticmethod
    def forward_rows(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev, zoneout_h,
                     zoneout_c, valid):
        ptrs, strides, consts, B, H, GH = _common(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias,
                                                  h_prev, c_prev, zoneout_h, zoneout_c, valid)
        dt = ax.dtype
        h_new = torch.empty(B, H, dtype=dt, device=ax.device)
        y = torch.empty(B, H, dtype=dt, device=ax.device)
        c_new = torch.empty(B, H, dtype=dt, device=ax.device) if cell == "lstm" else ax.new_empty(0)
        if B == 0 or H == 0:
            return h_new, c_new, y
        _refuse(cell, ax, H)
        with _on_device(ax):
            ext_forward_rows_kernel[(B,)](*ptrs, h_new, c_new if cell == "lstm" else h_new, y, H, *strides,
                                          num_warps=num_warps(consts["BLOCK"], ax.element_size()),
                                          maxnreg=MAX_REGISTERS, **consts)
        return h_new, c_new, y

    @staticmethod
    def backward_rows(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev, zoneout_h,
                      zoneout_c, valid, grad_h, grad_y, grad_c, acc):
        ptrs, strides, consts, B, H, GH = _common(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias,
                                                  h_prev, c_prev, zoneout_h, zoneout_c, valid)
        dt, cdt = ax.dtype, acc_dtype(ax.dtype)
        lstm = cell == "lstm"
        if acc.shape != (B, ext_acc_width(cell, H)):
            raise ValueError(f"acc: expected [{B}, {ext_acc_width(cell, H)}], got {list(acc.shape)}")
        if lstm and grad_c is None:
            raise ValueError("the LSTM needs grad_c")
        d_ax = torch.empty(B, GH, dtype=dt, device=ax.device)
        d_ah = torch.empty(B, GH, dtype=dt, device=ax.device)
        gh_prev = torch.empty(B, H, dtype=cdt, device=ax.device)
        gc_prev = torch.empty(B, H, dtype=cdt, device=ax.device) if lstm else grad_h.new_empty(0)
        if B == 0 or H == 0:
            return d_ax, d_ah, gh_prev, gc_prev
        _refuse(cell, ax, H)
        grad_h, gh_s = _rows(grad_h)
        grad_y, gy_s = _rows(grad_y)
        grad_c, gc_s = _rows(grad_c) if lstm else (grad_h, 0)
        # acc is updated in place: through a unit-stride copy when its rows are not
        work = acc if acc.stride(-1) == 1 else acc.contiguous()
        warps = num_warps(consts["BLOCK"], ax.element_size())
        with _on_device(ax):
            ext_backward_rows_kernel[(B,)](*ptrs, grad_h, grad_y, grad_c, work, d_ax, d_ah, gh_prev,
                                           gc_prev if lstm else gh_prev, H, *strides, gh_s, gy_s, gc_s,
                                           work.stride(0), num_warps=warps, maxnreg=MAX_REGISTERS, **consts)
        if work is not acc:
            acc.copy_(work)
        return d_ax, d_ah, gh_prev, gc_prev
