"""Persistent recurrence: one launch runs all T steps of one layer and direction.

Grid (batch tiles, hidden slices). Each program owns BLOCK_B sequences and BLOCK_H hidden units of every
gate, loads its slice of the recurrent weights once (Triton keeps it in shared memory for the whole loop)
and, inside the time loop, does the recurrent matmul (tl.dot, fp32 accumulation), the gate math and the
state update.

Tiles are feature-major, [features, BLOCK_B]: gates^T = W_hh[units, :] @ h^T. The weights are the A operand
of the dot, so on sm_90 Triton emits wgmma reading them straight from shared memory; batch-major h @ W^T
makes them mma.sync operands that pass through registers (a bare fp16 LSTM step loop at H=128, B=16,
8 warps, compiled for sm_90: 128 registers batch-major, 78 feature-major).

Variants (constexpr BARRIER):
- no barrier (grid (batch tiles, 1), BLOCK_H covers H): the whole recurrent matrix of a batch tile lives in
  one program; the state never leaves registers and programs never wait on each other. The interpreter
  runs this one, and CI tests it there.
- barrier (grid (batch tiles, slices)): every step each program publishes its slice of what the next
  matmul needs (forward: h; backward: the gate gradients) into a padded ping-pong buffer, then all programs
  of the batch tile meet at a grid barrier (an atomic counter) before reading the whole of it back. The
  backend (fusedrnn/backends/triton.py) starts it only when every program can be resident at once; under
  the interpreter, whose programs run one after another (they would wait forever), only inside
  concurrent_interpreter.concurrent_programs(), which runs each program in a thread
  (tests/test_triton_barrier.py: several slices and batch tiles, every cell, fwd + bwd, planted bugs).

Not done here: x_gates = x @ W_ih^T for all steps (one GEMM before the launch), and after the backward
launch dx, dW_ih, dW_hh, dW_hr and the biases (one GEMM / sum each over all steps). The workspace layout is
fusedrnn/backends/base.py's; rows of invalid steps are written too (the cell applied to the held state, as
the reference backend does), so any backend's backward can read them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cell_math import INTERPRET, configs, grid_barrier, mm, sigmoid, tanh


@triton.jit
def _program_tile(B, H: tl.constexpr, HO: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HO: tl.constexpr):
    """This program's batch rows, hidden units and state features (ks covers all HO), their masks, and the
    [units, rows] / [features, rows] tile masks."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ks = tl.arange(0, BLOCK_HO)
    rmask, umask, kmask = rows < B, units < H, ks < HO
    return rows, units, ks, rmask, umask, kmask, umask[:, None] & rmask[None, :], kmask[:, None] & rmask[None, :]


@triton.jit
def _load_lengths(len_ptr, rows, rmask, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr):
    """[BLOCK_B] int32 sequence lengths (zeros, unused, without HAS_LENGTHS)."""
    if HAS_LENGTHS:
        return tl.load(len_ptr + rows, mask=rmask, other=0).to(tl.int32)
    return tl.zeros([BLOCK_B], tl.int32)


@triton.jit
def _time_of_step(s, T, REVERSE: tl.constexpr, BACKWARD: tl.constexpr):
    """The time processed at loop iteration s: a forward pass runs in the layer's direction, its backward
    pass against it."""
    if REVERSE == BACKWARD:
        return s
    return T - 1 - s


@triton.jit
def _w_tile(w_ptr, m_idx, m_mask, k_idx, k_mask, stride, TRANSPOSE: tl.constexpr):
    """[M, K] tile: W[m, k] (row stride `stride`), or W[k, m] with TRANSPOSE; zeros where masked."""
    if TRANSPOSE:
        ptrs = w_ptr + k_idx[None, :] * stride + m_idx[:, None]
    else:
        ptrs = w_ptr + m_idx[:, None] * stride + k_idx[None, :]
    return tl.load(ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _prev_step(t, rows, lens, T, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """([BLOCK_B] bool, tp): step t of each sequence follows the valid step tp (else it started from the
    initial state). Forward: tp = t-1 (valid steps are a prefix). Reverse: tp = t+1 while tp < length."""
    if REVERSE:
        tp = t + 1
        has_prev = (rows >= 0) & (tp < T)
        if HAS_LENGTHS:
            has_prev = has_prev & (tp < lens)
    else:
        tp = t - 1
        has_prev = (rows >= 0) & (t > 0)
    return has_prev, tp


@triton.jit
def _bias(b_ih_ptr, b_hh_ptr, off, units, umask, BOTH: tl.constexpr):
    """[BLOCK_H, 1] fp32: b_ih[off + units] (+ b_hh[off + units] with BOTH)."""
    b = tl.load(b_ih_ptr + off + units, mask=umask, other=0.0)
    if BOTH:
        b += tl.load(b_hh_ptr + off + units, mask=umask, other=0.0)
    return b[:, None]


@triton.jit
def _barrier_state(h0_ptr, hbuf_ptr, s, B, rows, ks, m_k, HO: tl.constexpr, BLOCK_HO: tl.constexpr):
    """[BLOCK_HO, BLOCK_B] h_{t-1} at step s of a barrier launch: h0, then the slot of the ping-pong buffer
    [2, B, BLOCK_HO] the previous step wrote. h0 is read from its own tensor so that hbuf needs no
    initialisation and a second launch (autotuning) starts from the right state. Rows padded to BLOCK_HO:
    with HO's own row stride an odd HO leaves one 64-bit address per element (LSTM H=255: 208 B of spills).
    .cg: L1 is not coherent across SMs. Two slots suffice: a program writes slot s%2 again at step s+2, after
    the barrier of step s+1, which every program reaches only after its reads of step s."""
    if s == 0:
        h_in = tl.load(h0_ptr + rows[None, :] * HO + ks[:, None], mask=m_k, other=0.0, cache_modifier=".cg")
    else:
        h_in = tl.load(hbuf_ptr + (s % 2) * B * BLOCK_HO + rows[None, :] * BLOCK_HO + ks[:, None], mask=m_k,
                       other=0.0, cache_modifier=".cg")
    return h_in


@triton.jit
def _keep_invalid(new, old, t, lens, HAS_LENGTHS: tl.constexpr):
    """The state after step t: `new` where the step is valid (t < length), else `old` unchanged."""
    if HAS_LENGTHS:
        return tl.where((t < lens)[None, :], new, old)
    return new


@triton.jit
def _end_forward_step(h_new, h, s, t, T, lens, y_ptr, hbuf_ptr, sync_ptr, B, rows, cols, m,
                      HO: tl.constexpr, BLOCK_HO: tl.constexpr, HAS_LENGTHS: tl.constexpr, BARRIER: tl.constexpr):
    """Every forward kernel's step tail: stores y_t (zeros at invalid steps), and with BARRIER publishes the
    state columns `cols` and waits for the batch tile's other programs. Returns the state carried on."""
    h = _keep_invalid(h_new, h, t, lens, HAS_LENGTHS)
    out = _keep_invalid(h_new, tl.zeros_like(h_new), t, lens, HAS_LENGTHS)
    tl.store(y_ptr + t.to(tl.int64) * B * HO + rows[None, :] * HO + cols[:, None],
             out.to(y_ptr.dtype.element_ty), mask=m)
    if BARRIER:
        hb_next = hbuf_ptr + ((s + 1) % 2) * B * BLOCK_HO
        tl.store(hb_next + rows[None, :] * BLOCK_HO + cols[:, None], h.to(y_ptr.dtype.element_ty), mask=m)
        if s + 1 < T:  # nothing reads the state after the last step
            grid_barrier(sync_ptr + tl.program_id(0), (s + 1) * tl.num_programs(1))
    return h


# ---------------------------------------------------------------------------------------------------
# LSTM
# ---------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def lstm_persistent_fwd_kernel(
        xg_ptr,  # [T, B, 4H] x @ W_ih^T, storage dtype
        b_ih_ptr, b_hh_ptr,  # [4H] fp32 (HAS_BIAS)
        h0_ptr, c0_ptr,  # [B, HO], [B, H]
        w_hh_ptr,  # [4H, HO]
        w_hr_ptr,  # [HO, H] (HAS_PROJ)
        len_ptr,  # [B] int64 (HAS_LENGTHS)
        y_ptr, hn_ptr, cn_ptr,  # out [T, B, HO], [B, HO], [B, H]
        ws_ptr,  # out [T, B, 5H or 6H] (WRITE_WS)
        hbuf_ptr,  # [2, B, BLOCK_HO] storage dtype, ping-pong state exchange (BARRIER)
        sync_ptr,  # [batch tiles] int32 zeros (BARRIER)
        T, B, H: tl.constexpr, HO: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
        WRITE_WS: tl.constexpr, BARRIER: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_HO: tl.constexpr, BLOCK_B: tl.constexpr):
    tl.static_assert(not (HAS_PROJ and BARRIER), "the projection needs all units of a step in one program")
    dt = y_ptr.dtype.element_ty
    rows, units, ks, rmask, umask, kmask, m_u, m_k = _program_tile(B, H, HO, BLOCK_B, BLOCK_H, BLOCK_HO)

    w_i = _w_tile(w_hh_ptr, units, umask, ks, kmask, HO, False)  # [BLOCK_H, BLOCK_HO] per gate
    w_f = _w_tile(w_hh_ptr, units + H, umask, ks, kmask, HO, False)
    w_g = _w_tile(w_hh_ptr, units + 2 * H, umask, ks, kmask, HO, False)
    w_o = _w_tile(w_hh_ptr, units + 3 * H, umask, ks, kmask, HO, False)
    if DOT_FP32:
        w_i, w_f, w_g, w_o = w_i.to(tl.float32), w_f.to(tl.float32), w_g.to(tl.float32), w_o.to(tl.float32)
    if HAS_PROJ:
        w_r = _w_tile(w_hr_ptr, ks, kmask, units, umask, H, False)  # [BLOCK_HO, BLOCK_H]
        if DOT_FP32:
            w_r = w_r.to(tl.float32)
        ocols, omask = ks, kmask  # the state h this program updates: all of it
    else:
        ocols, omask = units, umask  # its units (HO == H)
    m_o = omask[:, None] & rmask[None, :]
    b_i = _bias(b_ih_ptr, b_hh_ptr, 0, units, umask & HAS_BIAS, True)
    b_f = _bias(b_ih_ptr, b_hh_ptr, H, units, umask & HAS_BIAS, True)
    b_g = _bias(b_ih_ptr, b_hh_ptr, 2 * H, units, umask & HAS_BIAS, True)
    b_o = _bias(b_ih_ptr, b_hh_ptr, 3 * H, units, umask & HAS_BIAS, True)

    # State in fp32 across steps, [features, BLOCK_B].
    h = tl.load(h0_ptr + rows[None, :] * HO + ocols[:, None], mask=m_o, other=0.0).to(tl.float32)
    c = tl.load(c0_ptr + rows[None, :] * H + units[:, None], mask=m_u, other=0.0).to(tl.float32)
    lens = _load_lengths(len_ptr, rows, rmask, HAS_LENGTHS, BLOCK_B)
    WS = 6 * H if HAS_PROJ else 5 * H

    for s in range(T):
        t = _time_of_step(s, T, REVERSE, False)
        t64 = t.to(tl.int64)
        if BARRIER:  # the whole h_{t-1}, published by every program of this batch tile
            h_in = _barrier_state(h0_ptr, hbuf_ptr, s, B, rows, ks, m_k, HO, BLOCK_HO)
        else:
            h_in = h.to(dt)
        xg = xg_ptr + t64 * B * 4 * H + rows[None, :] * (4 * H) + units[:, None]
        i = sigmoid(mm(w_i, h_in, tl.load(xg, mask=m_u, other=0.0).to(tl.float32) + b_i, DOT_FP32))
        f = sigmoid(mm(w_f, h_in, tl.load(xg + H, mask=m_u, other=0.0).to(tl.float32) + b_f, DOT_FP32))
        g = tanh(mm(w_g, h_in, tl.load(xg + 2 * H, mask=m_u, other=0.0).to(tl.float32) + b_g, DOT_FP32))
        o = sigmoid(mm(w_o, h_in, tl.load(xg + 3 * H, mask=m_u, other=0.0).to(tl.float32) + b_o, DOT_FP32))
        c_new = f * c + i * g
        r = o * tanh(c_new)
        if HAS_PROJ:
            h_new = mm(w_r, r.to(dt), tl.zeros([BLOCK_HO, BLOCK_B], tl.float32), DOT_FP32)
        else:
            h_new = r
        if WRITE_WS:
            wsp = ws_ptr + t64 * B * WS + rows[None, :] * WS + units[:, None]
            tl.store(wsp, i.to(dt), mask=m_u)
            tl.store(wsp + H, f.to(dt), mask=m_u)
            tl.store(wsp + 2 * H, g.to(dt), mask=m_u)
            tl.store(wsp + 3 * H, o.to(dt), mask=m_u)
            tl.store(wsp + 4 * H, c_new.to(dt), mask=m_u)
            if HAS_PROJ:
                tl.store(wsp + 5 * H, r.to(dt), mask=m_u)
        c = _keep_invalid(c_new, c, t, lens, HAS_LENGTHS)  # an invalid step keeps the state, writes zeros
        h = _end_forward_step(h_new, h, s, t, T, lens, y_ptr, hbuf_ptr, sync_ptr, B, rows, ocols, m_o, HO,
                              BLOCK_HO, HAS_LENGTHS, BARRIER)

    tl.store(hn_ptr + rows[None, :] * HO + ocols[:, None], h.to(dt), mask=m_o)
    tl.store(cn_ptr + rows[None, :] * H + units[:, None], c.to(dt), mask=m_u)


@triton.jit(do_not_specialize=["T"])
def lstm_persistent_bwd_kernel(
        ws_ptr,  # [T, B, 5H or 6H] the forward's workspace
        c0_ptr,  # [B, H]
        w_hh_ptr, w_hr_ptr,  # [4H, HO], [HO, H]
        len_ptr,
        gy_ptr, ghn_ptr, gcn_ptr,  # [T, B, HO], [B, HO], [B, H]
        dg_ptr,  # out [T, B, 4H] storage dtype: grad of the gate pre-activations, 0 at invalid steps
        gout_ptr,  # out [T, B, HO] (HAS_PROJ): grad of each step's projected output, for dW_hr
        gh0_ptr, gc0_ptr,  # out [B, HO], [B, H] fp32
        xbuf_ptr,  # [2, B, 4, BLOCK_HO] storage dtype: gate-gradient exchange (BARRIER)
        sync_ptr,
        T, B, H: tl.constexpr, HO: tl.constexpr,
        HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, BARRIER: tl.constexpr,
        DOT_FP32: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HO: tl.constexpr, BLOCK_B: tl.constexpr):
    tl.static_assert(not (HAS_PROJ and BARRIER), "the projection needs all units of a step in one program")
    dt = dg_ptr.dtype.element_ty
    pid_b = tl.program_id(0)
    rows, units, ks, rmask, umask, kmask, m_u, m_k = _program_tile(B, H, HO, BLOCK_B, BLOCK_H, BLOCK_HO)

    if BARRIER:
        # grad h_{t-1}[units] = sum_g W_g[:, units]^T @ dg_g[all units]: [BLOCK_H, BLOCK_HO] (HO == H); the
        # gate gradients of every program are read back after the barrier.
        w_i = _w_tile(w_hh_ptr, units, umask, ks, kmask, HO, True)
        w_f = _w_tile(w_hh_ptr, units, umask, ks + H, kmask, HO, True)
        w_g = _w_tile(w_hh_ptr, units, umask, ks + 2 * H, kmask, HO, True)
        w_o = _w_tile(w_hh_ptr, units, umask, ks + 3 * H, kmask, HO, True)
    else:
        # grad h_{t-1} = sum_g W_g^T @ dg_g: [BLOCK_HO, BLOCK_H] tiles
        w_i = _w_tile(w_hh_ptr, ks, kmask, units, umask, HO, True)
        w_f = _w_tile(w_hh_ptr, ks, kmask, units + H, umask, HO, True)
        w_g = _w_tile(w_hh_ptr, ks, kmask, units + 2 * H, umask, HO, True)
        w_o = _w_tile(w_hh_ptr, ks, kmask, units + 3 * H, umask, HO, True)
    if DOT_FP32:
        w_i, w_f, w_g, w_o = w_i.to(tl.float32), w_f.to(tl.float32), w_g.to(tl.float32), w_o.to(tl.float32)
    if HAS_PROJ:
        w_r = _w_tile(w_hr_ptr, units, umask, ks, kmask, H, True)  # W_hr^T [BLOCK_H, BLOCK_HO]
        if DOT_FP32:
            w_r = w_r.to(tl.float32)
        ocols, omask = ks, kmask
    else:
        ocols, omask = units, umask
    m_o = omask[:, None] & rmask[None, :]
    gh = tl.load(ghn_ptr + rows[None, :] * HO + ocols[:, None], mask=m_o, other=0.0).to(tl.float32)
    gc = tl.load(gcn_ptr + rows[None, :] * H + units[:, None], mask=m_u, other=0.0).to(tl.float32)
    lens = _load_lengths(len_ptr, rows, rmask, HAS_LENGTHS, BLOCK_B)
    WS = 6 * H if HAS_PROJ else 5 * H

    for s in range(T):
        t = _time_of_step(s, T, REVERSE, True)
        t64 = t.to(tl.int64)
        go = gh + tl.load(gy_ptr + t64 * B * HO + rows[None, :] * HO + ocols[:, None], mask=m_o,
                          other=0.0).to(tl.float32)
        if HAS_LENGTHS:
            valid = (t < lens)[None, :]
        if HAS_PROJ:
            if HAS_LENGTHS:
                go = tl.where(valid, go, 0.0)
            tl.store(gout_ptr + t64 * B * HO + rows[None, :] * HO + ocols[:, None], go.to(dt), mask=m_o)
            gr = mm(w_r, go.to(dt), tl.zeros([BLOCK_H, BLOCK_B], tl.float32), DOT_FP32)
        else:
            gr = go
        wsp = ws_ptr + t64 * B * WS + rows[None, :] * WS + units[:, None]
        i = tl.load(wsp, mask=m_u, other=0.0).to(tl.float32)
        f = tl.load(wsp + H, mask=m_u, other=0.0).to(tl.float32)
        g = tl.load(wsp + 2 * H, mask=m_u, other=0.0).to(tl.float32)
        o = tl.load(wsp + 3 * H, mask=m_u, other=0.0).to(tl.float32)
        c = tl.load(wsp + 4 * H, mask=m_u, other=0.0).to(tl.float32)
        has_prev, tp = _prev_step(t, rows, lens, T, REVERSE, HAS_LENGTHS)
        # one load from either the previous step's c or c0 (no c0 tile held across the loop)
        c_prev = tl.load(tl.where(has_prev[None, :],
                                  ws_ptr + tp.to(tl.int64) * B * WS + rows[None, :] * WS + 4 * H + units[:, None],
                                  c0_ptr + rows[None, :] * H + units[:, None]), mask=m_u, other=0.0).to(tl.float32)

        tanh_c = tanh(c)
        gct = gc + gr * o * (1.0 - tanh_c * tanh_c)
        d_i = gct * g * i * (1.0 - i)
        d_f = gct * c_prev * f * (1.0 - f)
        d_g = gct * i * (1.0 - g * g)
        d_o = gr * tanh_c * o * (1.0 - o)
        if HAS_LENGTHS:  # an invalid step did nothing: zero gate gradients, the state gradient passes
            d_i = tl.where(valid, d_i, 0.0)
            d_f = tl.where(valid, d_f, 0.0)
            d_g = tl.where(valid, d_g, 0.0)
            d_o = tl.where(valid, d_o, 0.0)
            gc = tl.where(valid, gct * f, gc)
        else:
            gc = gct * f
        dgp = dg_ptr + t64 * B * 4 * H + rows[None, :] * (4 * H) + units[:, None]
        tl.store(dgp, d_i.to(dt), mask=m_u)
        tl.store(dgp + H, d_f.to(dt), mask=m_u)
        tl.store(dgp + 2 * H, d_g.to(dt), mask=m_u)
        tl.store(dgp + 3 * H, d_o.to(dt), mask=m_u)

        acc = tl.zeros([BLOCK_H if BARRIER else BLOCK_HO, BLOCK_B], tl.float32)
        if BARRIER:  # padded exchange slots, as _barrier_state explains
            xb = xbuf_ptr + (s % 2) * B * 4 * BLOCK_HO + rows[None, :] * (4 * BLOCK_HO)
            tl.store(xb + units[:, None], d_i.to(dt), mask=m_u)
            tl.store(xb + BLOCK_HO + units[:, None], d_f.to(dt), mask=m_u)
            tl.store(xb + 2 * BLOCK_HO + units[:, None], d_g.to(dt), mask=m_u)
            tl.store(xb + 3 * BLOCK_HO + units[:, None], d_o.to(dt), mask=m_u)
            grid_barrier(sync_ptr + pid_b, (s + 1) * tl.num_programs(1))
            xa = xb + ks[:, None]
            acc = mm(w_i, tl.load(xa, mask=m_k, other=0.0, cache_modifier=".cg"), acc, DOT_FP32)
            acc = mm(w_f, tl.load(xa + BLOCK_HO, mask=m_k, other=0.0, cache_modifier=".cg"), acc, DOT_FP32)
            acc = mm(w_g, tl.load(xa + 2 * BLOCK_HO, mask=m_k, other=0.0, cache_modifier=".cg"), acc, DOT_FP32)
            acc = mm(w_o, tl.load(xa + 3 * BLOCK_HO, mask=m_k, other=0.0, cache_modifier=".cg"), acc, DOT_FP32)
        else:
            acc = mm(w_i, d_i.to(dt), acc, DOT_FP32)
            acc = mm(w_f, d_f.to(dt), acc, DOT_FP32)
            acc = mm(w_g, d_g.to(dt), acc, DOT_FP32)
            acc = mm(w_o, d_o.to(dt), acc, DOT_FP32)
        if HAS_LENGTHS:
            gh = tl.where(valid, acc, gh)
        else:
            gh = acc

    tl.store(gh0_ptr + rows[None, :] * HO + ocols[:, None], gh, mask=m_o)
    tl.store(gc0_ptr + rows[None, :] * H + units[:, None], gc, mask=m_u)


# ---------------------------------------------------------------------------------------------------
# GRU (PyTorch's reset-after form: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)))
# ---------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def gru_persistent_fwd_kernel(
        xg_ptr,  # [T, B, 3H] x @ W_ih^T
        b_ih_ptr, b_hh_ptr,  # [3H] fp32 (HAS_BIAS)
        h0_ptr,  # [B, H]
        w_hh_ptr,  # [3H, H]
        len_ptr,
        y_ptr, hn_ptr,  # out [T, B, H], [B, H]
        ws_ptr,  # out [T, B, 4H]: r, z, n, W_hn h + b_hn (WRITE_WS)
        hbuf_ptr, sync_ptr,  # BARRIER
        T, B, H: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, WRITE_WS: tl.constexpr,
        BARRIER: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_HO: tl.constexpr, BLOCK_B: tl.constexpr):
    dt = y_ptr.dtype.element_ty
    rows, units, ks, rmask, umask, kmask, m_u, m_k = _program_tile(B, H, H, BLOCK_B, BLOCK_H, BLOCK_HO)

    w_r = _w_tile(w_hh_ptr, units, umask, ks, kmask, H, False)
    w_z = _w_tile(w_hh_ptr, units + H, umask, ks, kmask, H, False)
    w_n = _w_tile(w_hh_ptr, units + 2 * H, umask, ks, kmask, H, False)
    if DOT_FP32:
        w_r, w_z, w_n = w_r.to(tl.float32), w_z.to(tl.float32), w_n.to(tl.float32)
    b_r = _bias(b_ih_ptr, b_hh_ptr, 0, units, umask & HAS_BIAS, True)
    b_z = _bias(b_ih_ptr, b_hh_ptr, H, units, umask & HAS_BIAS, True)
    b_in = _bias(b_ih_ptr, b_hh_ptr, 2 * H, units, umask & HAS_BIAS, False)
    b_hn = _bias(b_hh_ptr, b_hh_ptr, 2 * H, units, umask & HAS_BIAS, False)

    h = tl.load(h0_ptr + rows[None, :] * H + units[:, None], mask=m_u, other=0.0).to(tl.float32)
    lens = _load_lengths(len_ptr, rows, rmask, HAS_LENGTHS, BLOCK_B)

    for s in range(T):
        t = _time_of_step(s, T, REVERSE, False)
        t64 = t.to(tl.int64)
        if BARRIER:
            h_in = _barrier_state(h0_ptr, hbuf_ptr, s, B, rows, ks, m_k, H, BLOCK_HO)
        else:
            h_in = h.to(dt)
        xg = xg_ptr + t64 * B * 3 * H + rows[None, :] * (3 * H) + units[:, None]
        r = sigmoid(mm(w_r, h_in, tl.load(xg, mask=m_u, other=0.0).to(tl.float32) + b_r, DOT_FP32))
        z = sigmoid(mm(w_z, h_in, tl.load(xg + H, mask=m_u, other=0.0).to(tl.float32) + b_z, DOT_FP32))
        hn = mm(w_n, h_in, tl.zeros([BLOCK_H, BLOCK_B], tl.float32) + b_hn, DOT_FP32)
        n = tanh(tl.load(xg + 2 * H, mask=m_u, other=0.0).to(tl.float32) + b_in + r * hn)
        h_new = (1.0 - z) * n + z * h
        if WRITE_WS:
            wsp = ws_ptr + t64 * B * 4 * H + rows[None, :] * (4 * H) + units[:, None]
            tl.store(wsp, r.to(dt), mask=m_u)
            tl.store(wsp + H, z.to(dt), mask=m_u)
            tl.store(wsp + 2 * H, n.to(dt), mask=m_u)
            tl.store(wsp + 3 * H, hn.to(dt), mask=m_u)
        h = _end_forward_step(h_new, h, s, t, T, lens, y_ptr, hbuf_ptr, sync_ptr, B, rows, units, m_u, H,
                              BLOCK_HO, HAS_LENGTHS, BARRIER)

    tl.store(hn_ptr + rows[None, :] * H + units[:, None], h.to(dt), mask=m_u)


@triton.jit(do_not_specialize=["T"])
def gru_persistent_bwd_kernel(
        ws_ptr,  # [T, B, 4H]
        y_ptr, h0_ptr,  # [T, B, H], [B, H]: the previous states
        w_hh_ptr,  # [3H, H]
        len_ptr,
        gy_ptr, ghn_ptr,  # [T, B, H], [B, H]
        dgx_ptr,  # out [T, B, 3H]: grad of W_ih x + b_ih
        dgh_ptr,  # out [T, B, 3H]: grad of W_hh h + b_hh (differs in n: times r)
        gh0_ptr,  # out [B, H] fp32
        xbuf_ptr,  # [2, B, 3, BLOCK_HO] (BARRIER)
        sync_ptr,
        T, B, H: tl.constexpr,
        HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, BARRIER: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_HO: tl.constexpr, BLOCK_B: tl.constexpr):
    dt = dgx_ptr.dtype.element_ty
    pid_b = tl.program_id(0)
    rows, units, ks, rmask, umask, kmask, m_u, m_k = _program_tile(B, H, H, BLOCK_B, BLOCK_H, BLOCK_HO)

    if BARRIER:  # [BLOCK_H, BLOCK_HO]: W_g[all units, units]^T
        w_r = _w_tile(w_hh_ptr, units, umask, ks, kmask, H, True)
        w_z = _w_tile(w_hh_ptr, units, umask, ks + H, kmask, H, True)
        w_n = _w_tile(w_hh_ptr, units, umask, ks + 2 * H, kmask, H, True)
    else:  # [BLOCK_HO, BLOCK_H] (BLOCK_HO == BLOCK_H): W_g^T
        w_r = _w_tile(w_hh_ptr, ks, kmask, units, umask, H, True)
        w_z = _w_tile(w_hh_ptr, ks, kmask, units + H, umask, H, True)
        w_n = _w_tile(w_hh_ptr, ks, kmask, units + 2 * H, umask, H, True)
    if DOT_FP32:
        w_r, w_z, w_n = w_r.to(tl.float32), w_z.to(tl.float32), w_n.to(tl.float32)
    gh = tl.load(ghn_ptr + rows[None, :] * H + units[:, None], mask=m_u, other=0.0).to(tl.float32)
    lens = _load_lengths(len_ptr, rows, rmask, HAS_LENGTHS, BLOCK_B)

    for s in range(T):
        t = _time_of_step(s, T, REVERSE, True)
        t64 = t.to(tl.int64)
        go = gh + tl.load(gy_ptr + t64 * B * H + rows[None, :] * H + units[:, None], mask=m_u,
                          other=0.0).to(tl.float32)
        wsp = ws_ptr + t64 * B * 4 * H + rows[None, :] * (4 * H) + units[:, None]
        r = tl.load(wsp, mask=m_u, other=0.0).to(tl.float32)
        z = tl.load(wsp + H, mask=m_u, other=0.0).to(tl.float32)
        n = tl.load(wsp + 2 * H, mask=m_u, other=0.0).to(tl.float32)
        hn = tl.load(wsp + 3 * H, mask=m_u, other=0.0).to(tl.float32)
        has_prev, tp = _prev_step(t, rows, lens, T, REVERSE, HAS_LENGTHS)
        h_prev = tl.load(tl.where(has_prev[None, :],
                                  y_ptr + tp.to(tl.int64) * B * H + rows[None, :] * H + units[:, None],
                                  h0_ptr + rows[None, :] * H + units[:, None]), mask=m_u, other=0.0).to(tl.float32)

        d_n = go * (1.0 - z) * (1.0 - n * n)
        d_r = d_n * hn * r * (1.0 - r)
        d_z = go * (h_prev - n) * z * (1.0 - z)
        direct = go * z
        if HAS_LENGTHS:
            valid = (t < lens)[None, :]
            d_n = tl.where(valid, d_n, 0.0)
            d_r = tl.where(valid, d_r, 0.0)
            d_z = tl.where(valid, d_z, 0.0)
        d_hn = d_n * r
        dxp = dgx_ptr + t64 * B * 3 * H + rows[None, :] * (3 * H) + units[:, None]
        tl.store(dxp, d_r.to(dt), mask=m_u)
        tl.store(dxp + H, d_z.to(dt), mask=m_u)
        tl.store(dxp + 2 * H, d_n.to(dt), mask=m_u)
        dhp = dgh_ptr + t64 * B * 3 * H + rows[None, :] * (3 * H) + units[:, None]
        tl.store(dhp, d_r.to(dt), mask=m_u)
        tl.store(dhp + H, d_z.to(dt), mask=m_u)
        tl.store(dhp + 2 * H, d_hn.to(dt), mask=m_u)

        if BARRIER:
            xb = xbuf_ptr + (s % 2) * B * 3 * BLOCK_HO + rows[None, :] * (3 * BLOCK_HO)
            tl.store(xb + units[:, None], d_r.to(dt), mask=m_u)
            tl.store(xb + BLOCK_HO + units[:, None], d_z.to(dt), mask=m_u)
            tl.store(xb + 2 * BLOCK_HO + units[:, None], d_hn.to(dt), mask=m_u)
            grid_barrier(sync_ptr + pid_b, (s + 1) * tl.num_programs(1))
            xa = xb + ks[:, None]
            acc = mm(w_r, tl.load(xa, mask=m_k, other=0.0, cache_modifier=".cg"), direct, DOT_FP32)
            acc = mm(w_z, tl.load(xa + BLOCK_HO, mask=m_k, other=0.0, cache_modifier=".cg"), acc, DOT_FP32)
            acc = mm(w_n, tl.load(xa + 2 * BLOCK_HO, mask=m_k, other=0.0, cache_modifier=".cg"), acc, DOT_FP32)
        else:
            acc = mm(w_r, d_r.to(dt), direct, DOT_FP32)
            acc = mm(w_z, d_z.to(dt), acc, DOT_FP32)
            acc = mm(w_n, d_hn.to(dt), acc, DOT_FP32)
        if HAS_LENGTHS:
            gh = tl.where(valid, acc, gh)
        else:
            gh = acc

    tl.store(gh0_ptr + rows[None, :] * H + units[:, None], gh, mask=m_u)


# ---------------------------------------------------------------------------------------------------
# RNN (tanh / relu)
# ---------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def rnn_persistent_fwd_kernel(
        xg_ptr,  # [T, B, H]
        b_ih_ptr, b_hh_ptr, h0_ptr, w_hh_ptr, len_ptr,
        y_ptr, hn_ptr,  # out [T, B, H], [B, H]; y holds everything backward needs
        hbuf_ptr, sync_ptr,
        T, B, H: tl.constexpr,
        RELU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
        BARRIER: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_HO: tl.constexpr, BLOCK_B: tl.constexpr):
    dt = y_ptr.dtype.element_ty
    rows, units, ks, rmask, umask, kmask, m_u, m_k = _program_tile(B, H, H, BLOCK_B, BLOCK_H, BLOCK_HO)

    w = _w_tile(w_hh_ptr, units, umask, ks, kmask, H, False)
    if DOT_FP32:
        w = w.to(tl.float32)
    b = _bias(b_ih_ptr, b_hh_ptr, 0, units, umask & HAS_BIAS, True)
    h = tl.load(h0_ptr + rows[None, :] * H + units[:, None], mask=m_u, other=0.0).to(tl.float32)
    lens = _load_lengths(len_ptr, rows, rmask, HAS_LENGTHS, BLOCK_B)

    for s in range(T):
        t = _time_of_step(s, T, REVERSE, False)
        t64 = t.to(tl.int64)
        if BARRIER:
            h_in = _barrier_state(h0_ptr, hbuf_ptr, s, B, rows, ks, m_k, H, BLOCK_HO)
        else:
            h_in = h.to(dt)
        xg = xg_ptr + t64 * B * H + rows[None, :] * H + units[:, None]
        pre = mm(w, h_in, tl.load(xg, mask=m_u, other=0.0).to(tl.float32) + b, DOT_FP32)
        if RELU:
            h_new = tl.maximum(pre, 0.0)
        else:
            h_new = tanh(pre)
        h = _end_forward_step(h_new, h, s, t, T, lens, y_ptr, hbuf_ptr, sync_ptr, B, rows, units, m_u, H,
                              BLOCK_HO, HAS_LENGTHS, BARRIER)

    tl.store(hn_ptr + rows[None, :] * H + units[:, None], h.to(dt), mask=m_u)


@triton.jit(do_not_specialize=["T"])
def rnn_persistent_bwd_kernel(
        y_ptr,  # [T, B, H] the forward's output: h_t at valid steps
        w_hh_ptr, len_ptr,
        gy_ptr, ghn_ptr,
        dg_ptr,  # out [T, B, H]: grad of the pre-activation
        gh0_ptr,  # out [B, H] fp32
        xbuf_ptr,  # [2, B, BLOCK_HO] (BARRIER)
        sync_ptr,
        T, B, H: tl.constexpr,
        RELU: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, BARRIER: tl.constexpr,
        DOT_FP32: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HO: tl.constexpr, BLOCK_B: tl.constexpr):
    dt = dg_ptr.dtype.element_ty
    pid_b = tl.program_id(0)
    rows, units, ks, rmask, umask, kmask, m_u, m_k = _program_tile(B, H, H, BLOCK_B, BLOCK_H, BLOCK_HO)

    if BARRIER:
        w = _w_tile(w_hh_ptr, units, umask, ks, kmask, H, True)
    else:
        w = _w_tile(w_hh_ptr, ks, kmask, units, umask, H, True)
    if DOT_FP32:
        w = w.to(tl.float32)
    gh = tl.load(ghn_ptr + rows[None, :] * H + units[:, None], mask=m_u, other=0.0).to(tl.float32)
    lens = _load_lengths(len_ptr, rows, rmask, HAS_LENGTHS, BLOCK_B)

    for s in range(T):
        t = _time_of_step(s, T, REVERSE, True)
        t64 = t.to(tl.int64)
        off = t64 * B * H + rows[None, :] * H + units[:, None]
        go = gh + tl.load(gy_ptr + off, mask=m_u, other=0.0).to(tl.float32)
        h = tl.load(y_ptr + off, mask=m_u, other=0.0).to(tl.float32)
        if RELU:
            d = tl.where(h > 0.0, go, 0.0)
        else:
            d = go * (1.0 - h * h)
        if HAS_LENGTHS:
            valid = (t < lens)[None, :]
            d = tl.where(valid, d, 0.0)
        tl.store(dg_ptr + off, d.to(dt), mask=m_u)
        acc = tl.zeros([BLOCK_H, BLOCK_B], tl.float32)
        if BARRIER:
            xb = xbuf_ptr + (s % 2) * B * BLOCK_HO + rows[None, :] * BLOCK_HO
            tl.store(xb + units[:, None], d.to(dt), mask=m_u)
            grid_barrier(sync_ptr + pid_b, (s + 1) * tl.num_programs(1))
            acc = mm(w, tl.load(xb + ks[:, None], mask=m_k, other=0.0, cache_modifier=".cg"), acc, DOT_FP32)
        else:
            acc = mm(w, d.to(dt), acc, DOT_FP32)
        if HAS_LENGTHS:
            gh = tl.where(valid, acc, gh)
        else:
            gh = acc

    tl.store(gh0_ptr + rows[None, :] * H + units[:, None], gh, mask=m_u)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
# BLOCK_B = 8: the batch is the N dimension of the dot (wgmma and mma.sync take N = 8). The gate tiles
# [rows, BLOCK_B] fp32 live in registers: at 16 the LSTM barrier variant (H=255, 8 warps) spilled 136 B
# and the 4-warp LSTM at H=127 152 B; at 8 neither spills. More, narrower batch tiles also spread a batch
# over more SMs, and the step latency, not the throughput, bounds a recurrence.
# num_stages=1, not a tuning choice: a software-pipelined loop would prefetch the next step's loads, and in
# the barrier variant those read what other programs write before that step's barrier.
_CONFIGS = [triton.Config({"BLOCK_B": 8}, num_warps=4, num_stages=1),
            triton.Config({"BLOCK_B": 8}, num_warps=8, num_stages=1)]
CONFIGS = configs(_CONFIGS)
BLOCK_B = 8

# Shared memory a program may fill with its weights; the rest of the 227 KB is Triton's scratch (layout
# conversions, the dot's B operand). tests/test_triton_static.py compiles the largest configuration each
# rule admits for sm_90 and checks it fits, without spills. At 160 KB the LSTM with projection (H=127,
# P=126, bwd) spilled 56 B.
WEIGHT_BUDGET = 128 * 1024
# 4 warps only up to this many bytes of weights: above it the 4-warp programs spilled (LSTM H=127 bwd:
# 152 B, RNN H=255 fwd: 264 B) where 8 warps did not.
FOUR_WARPS_MAX_WEIGHTS = 64 * 1024
# Barrier slices: 64 or 128 units, so the weights are wgmma's A operand read from shared memory. Narrower
# slices compile to mma.sync, whose operands pass through registers: 792 B of spills for an LSTM at
# H=1023 with 16 units per program. The whole h_{t-1} ([BLOCK_HO, BLOCK_B]) is read every step: up to
# BLOCK_HO 512 (an RNN at H=1023 spilled 624 B); fp16/bf16 only (fp32's tf32x3 splits that operand in two:
# an RNN at H=255 spilled 576 B).
BARRIER_SLICES = (128, 64)
BARRIER_MAX_BLOCK = 512
# Gate rows a program computes per step (G x BLOCK_H): their [rows, BLOCK_B] fp32 tiles live in registers.
# 512 covers an LSTM/GRU at H=128 and an RNN at H=256; a projection with a narrow output would otherwise
# admit H=511 (4 x [512, 16] gate tiles alone: 128 registers a thread at 8 warps). fp32 rows count twice
# (tf32x3 splits every operand): the fp32 LSTM with projection at H=127 spilled 8 B.
MAX_GATE_ROWS = 512
MIN_BLOCK = 16  # tl.dot on fp16/bf16 needs K >= 16 on the GPU; every block is some dot's K


def block(n: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(n))


def weight_bytes(cell: str, block_h: int, block_ho: int, elem: int, has_proj: bool = False) -> int:
    """Shared memory for the recurrent weights one program keeps: G gates x [block_h, block_ho]
    (+ W_hr [block_ho, block_h]); fp32 counts twice: tf32x3 keeps a high and a low TF32 part."""
    gates = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}[cell]
    return (gates + (1 if has_proj else 0)) * block_h * block_ho * elem * (2 if elem == 4 else 1)


def gate_rows(cell: str, block_h: int, elem: int) -> int:
    return {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}[cell] * block_h * (2 if elem == 4 else 1)


def no_barrier_fits(cell: str, H: int, HO: int, elem: int, has_proj: bool) -> bool:
    """The whole recurrent matrix of a batch tile fits one program."""
    return (weight_bytes(cell, block(H), block(HO), elem, has_proj) <= WEIGHT_BUDGET
            and gate_rows(cell, block(H), elem) <= MAX_GATE_ROWS)


def barrier_slice(cell: str, H: int, elem: int):
    """Hidden units per program for the barrier variant (the widest that fits), or None."""
    if elem == 4 or block(H) > BARRIER_MAX_BLOCK:
        return None
    for bh in BARRIER_SLICES:
        if (bh < block(H) and weight_bytes(cell, bh, block(H), elem) <= WEIGHT_BUDGET
                and gate_rows(cell, bh, elem) <= MAX_GATE_ROWS):
            return bh
    return None


# Index width. Step offsets are int64 (t.to(tl.int64) before any product with B; tests/test_index_width.py
# runs every kernel at T = 10^6 with offsets past 2^31), but two values stay int32: the sequence lengths a
# program holds (_load_lengths), so T must fit int32, and the barrier's arrival counter, which reaches
# T * slices (int32 atomics on sync_ptr).
INT32_MAX = 2**31 - 1


def steps_reason(T: int):
    """Why the persistent kernels cannot take T steps, or None."""
    if T > INT32_MAX:
        return f"T={T} steps: the persistent kernels hold the sequence lengths as int32 (at most {INT32_MAX})"
    return None


def barrier_counter_reason(T: int, slices: int):
    """Why the barrier variant cannot run T steps over `slices` programs per batch tile, or None."""
    if T * slices > INT32_MAX:
        return (f"T={T} steps x {slices} slices = {T * slices} arrivals at the grid barrier, whose counter is "
                f"int32 (at most {INT32_MAX})")
    return None


def config_allowed(num_warps: int, wbytes: int) -> bool:
    return num_warps >= 8 or wbytes <= FOUR_WARPS_MAX_WEIGHTS


def _prune(cell_gates: int):
    def prune(configs, nargs, **kwargs):
        elem = nargs["w_hh_ptr"].element_size()
        cell = {4: "lstm", 3: "gru", 1: "rnn_tanh"}[cell_gates]
        wbytes = weight_bytes(cell, kwargs["BLOCK_H"], kwargs["BLOCK_HO"], elem, kwargs.get("HAS_PROJ", False))
        return [c for c in configs if config_allowed(c.num_warps, wbytes)]
    return prune


def _tuned(kernel, gates: int, barrier: bool):
    # keyed on the hidden sizes only (HO: the LSTM projection); the sequence length is not specialised
    key = ["H", "HO"] if "HO" in kernel.arg_names else ["H"]
    return triton.autotune(CONFIGS, key=key, prune_configs_by={"early_config_prune": _prune(gates)},
                           reset_to_zero=["sync_ptr"] if barrier else None)(kernel)


_KERNELS = {
    ("lstm", "fwd"): lstm_persistent_fwd_kernel, ("lstm", "bwd"): lstm_persistent_bwd_kernel,
    ("gru", "fwd"): gru_persistent_fwd_kernel, ("gru", "bwd"): gru_persistent_bwd_kernel,
    ("rnn", "fwd"): rnn_persistent_fwd_kernel, ("rnn", "bwd"): rnn_persistent_bwd_kernel,
}
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}
_TUNED = {(stem, d, bar): _tuned(k, _GATES[stem], bar) for (stem, d), k in _KERNELS.items() for bar in (False, True)}


def _stem(cell: str) -> str:
    return "rnn" if cell.startswith("rnn") else cell


def _launch(cell, direction, barrier, block_h, B, n_split, args, consts):
    fn = _TUNED[(_stem(cell), direction, barrier)]
    if cell.startswith("rnn"):
        consts["RELU"] = cell == "rnn_relu"
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), n_split)  # noqa: E731
    fn[grid](*args, BARRIER=barrier, DOT_FP32=INTERPRET, BLOCK_H=block_h, **consts)


def persistent_forward(cell, xg, b_ih, b_hh, h0, c0, w_hh, w_hr, lengths, reverse, need_ws, slice_h=None):
    """One launch for all steps. xg [T, B, G*H] = x @ W_ih^T (no bias); biases fp32 or None; every tensor
    contiguous. slice_h: hidden units per program for the barrier variant (None: no barrier).
    Returns (y [T,B,HO], h_n [B,HO], c_n [B,H] or None, workspace [T,B,W] or None)."""
    T, B, GH = xg.shape
    HO = h0.shape[1]
    H = w_hh.shape[0] // {"lstm": 4, "gru": 3}.get(cell, 1)
    dev, dt = xg.device, xg.dtype
    barrier = slice_h is not None
    block_h = slice_h if barrier else block(H)
    n_split = triton.cdiv(H, block_h)
    dummy = torch.empty(1, device=dev, dtype=dt)
    dummy32 = torch.empty(1, device=dev, dtype=torch.float32)
    has_bias = b_ih is not None
    b_ih, b_hh = (b_ih, b_hh) if has_bias else (dummy32, dummy32)
    lens = lengths if lengths is not None else torch.empty(1, device=dev, dtype=torch.int64)
    y = torch.empty(T, B, HO, device=dev, dtype=dt)
    h_n = torch.empty(B, HO, device=dev, dtype=dt)
    hbuf = torch.empty(2, B, block(HO), device=dev, dtype=dt) if barrier else dummy
    sync = torch.zeros(triton.cdiv(B, BLOCK_B), device=dev, dtype=torch.int32) if barrier else \
        torch.empty(1, device=dev, dtype=torch.int32)
    common = dict(HAS_BIAS=has_bias, HAS_LENGTHS=lengths is not None, REVERSE=bool(reverse),
                  BLOCK_HO=block(HO))
    if cell == "lstm":
        has_proj = w_hr is not None
        c_n = torch.empty(B, H, device=dev, dtype=dt)
        ws = torch.empty(T, B, (6 if has_proj else 5) * H, device=dev, dtype=dt) if need_ws else None
        args = (xg, b_ih, b_hh, h0, c0, w_hh, w_hr if has_proj else dummy, lens, y, h_n, c_n,
                ws if need_ws else dummy, hbuf, sync, T, B)
        _launch(cell, "fwd", barrier, block_h, B, n_split, args,
                dict(common, H=H, HO=HO, HAS_PROJ=has_proj, WRITE_WS=need_ws))
        return y, h_n, c_n, ws
    if cell == "gru":
        ws = torch.empty(T, B, 4 * H, device=dev, dtype=dt) if need_ws else None
        args = (xg, b_ih, b_hh, h0, w_hh, lens, y, h_n, ws if need_ws else dummy, hbuf, sync, T, B)
        _launch(cell, "fwd", barrier, block_h, B, n_split, args, dict(common, H=H, WRITE_WS=need_ws))
        return y, h_n, None, ws
    args = (xg, b_ih, b_hh, h0, w_hh, lens, y, h_n, hbuf, sync, T, B)
    _launch(cell, "fwd", barrier, block_h, B, n_split, args, dict(common, H=H))
    return y, h_n, None, None


def persistent_backward(cell, ws, y, h0, c0, w_hh, w_hr, lengths, reverse, grad_y, grad_h_n, grad_c_n,
                        slice_h=None):
    """The reverse time loop in one launch. Returns (dgx [T,B,G*H], dgh [T,B,G*H] (the same tensor except
    for GRU), gout [T,B,HO] or None (projection), grad_h0 [B,HO] fp32, grad_c0 [B,H] fp32 or None)."""
    T, B, HO = y.shape
    H = w_hh.shape[0] // {"lstm": 4, "gru": 3}.get(cell, 1)
    dev, dt = y.device, y.dtype
    barrier = slice_h is not None
    block_h = slice_h if barrier else block(H)
    n_split = triton.cdiv(H, block_h)
    dummy = torch.empty(1, device=dev, dtype=dt)
    lens = lengths if lengths is not None else torch.empty(1, device=dev, dtype=torch.int64)
    sync = torch.zeros(triton.cdiv(B, BLOCK_B), device=dev, dtype=torch.int32) if barrier else \
        torch.empty(1, device=dev, dtype=torch.int32)
    gh0 = torch.empty(B, HO, device=dev, dtype=torch.float32)

    def xbuf(gates):
        return torch.empty(2, B, gates * block(H), device=dev, dtype=dt) if barrier else dummy
    common = dict(HAS_LENGTHS=lengths is not None, REVERSE=bool(reverse), BLOCK_HO=block(HO))
    if cell == "lstm":
        has_proj = w_hr is not None
        dg = torch.empty(T, B, 4 * H, device=dev, dtype=dt)
        gout = torch.empty(T, B, HO, device=dev, dtype=dt) if has_proj else None
        gc0 = torch.empty(B, H, device=dev, dtype=torch.float32)
        args = (ws, c0, w_hh, w_hr if has_proj else dummy, lens, grad_y, grad_h_n, grad_c_n, dg,
                gout if has_proj else dummy, gh0, gc0, xbuf(4), sync, T, B)
        _launch(cell, "bwd", barrier, block_h, B, n_split, args, dict(common, H=H, HO=HO, HAS_PROJ=has_proj))
        return dg, dg, gout, gh0, gc0
    if cell == "gru":
        dgx = torch.empty(T, B, 3 * H, device=dev, dtype=dt)
        dgh = torch.empty(T, B, 3 * H, device=dev, dtype=dt)
        args = (ws, y, h0, w_hh, lens, grad_y, grad_h_n, dgx, dgh, gh0, xbuf(3), sync, T, B)
        _launch(cell, "bwd", barrier, block_h, B, n_split, args, dict(common, H=H))
        return dgx, dgh, None, gh0, None
    dg = torch.empty(T, B, H, device=dev, dtype=dt)
    args = (y, w_hh, lens, grad_y, grad_h_n, dg, gh0, xbuf(1), sync, T, B)
    _launch(cell, "bwd", barrier, block_h, B, n_split, args, dict(common, H=H))
    return dg, dg, None, gh0, None
