"""The spec: readable pure-PyTorch time loops for one layer and one direction of every cell.

Every fast path in fusedrnn (C++ CPU, Triton, CUDA) implements exactly this signature and is tested
against these functions:

    y, h_n, c_n = <cell>_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths)

    x        [T, B, I]
    h0       [B, H_out]            H_out = proj_size if w_hr is given, else H
    c0       [B, H] (LSTM) or None
    w_ih     [G*H, I]              G = 4 (LSTM: i, f, g, o), 3 (GRU: r, z, n), 1 (RNN)
    w_hh     [G*H, H_out]
    b_ih     [G*H] or None
    b_hh     [G*H] or None
    w_hr     [H_out, H] (LSTM projection) or None
    reverse  run t = T-1 .. 0
    lengths  [B] int or None: step t of sequence b is valid iff t < lengths[b]. Invalid steps leave the
             state unchanged and write zeros to y, so a reversed sequence starts at its own last valid
             step lengths[b]-1.

    y        [T, B, H_out]
    h_n      [B, H_out]
    c_n      [B, H] (LSTM) or None

Half-precision inputs are computed in fp32 and the results rounded once to the input dtype; fp32 and fp64
are computed in their own precision. Autograd through these loops is the gradient spec. The keyword
`compute_dtype` overrides the compute precision: tests run the reference natively in fp16/bf16 to measure
PyTorch's own error at that dtype, from which the tolerance of a fast kernel is derived.
"""
from __future__ import annotations

import torch
from torch import Tensor

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    y = x @ w.t()
    return y if b is None else y + b


# ---------------------------------------------------------------------------------------------------
# One time step of each cell. Shapes: x [B, I], h [B, H_out], c [B, H].
# ---------------------------------------------------------------------------------------------------
def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None):
    """Returns (h_new [B, H_out], c_new [B, H])."""
    gates = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.t()
    return h_new, c_new


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """PyTorch's reset-after GRU: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)). Returns h_new [B, H]."""
    x_r, x_z, x_n = _linear(x, w_ih, b_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = _linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def rnn_tanh_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    return torch.tanh(_linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh))


def rnn_relu_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    return torch.relu(_linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh))


# ---------------------------------------------------------------------------------------------------
# One layer, one direction: the time loop with reverse and per-sequence lengths.
# ---------------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _time_loop(step, x, state, reverse, lengths, *, pass_time=False):
    """Runs `state = step(x[t], state)` (`step(x[t], state, t)` with pass_time) over time; state[0] is the
    output h. Returns (y, final state)."""
    T = x.shape[0]
    ys = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        new_state = step(x[t], state, t) if pass_time else step(x[t], state)
        if lengths is None:
            state = new_state
            ys[t] = new_state[0]
        else:
            valid = (t < lengths).unsqueeze(-1)  # [B, 1]
            state = tuple(torch.where(valid, new, old) for new, old in zip(new_state, state))
            ys[t] = torch.where(valid, new_state[0], torch.zeros_like(new_state[0]))
    if T == 0:
        return x.new_zeros((0,) + tuple(state[0].shape)), state
    return torch.stack(ys), state


def _layer(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths, compute_dtype=None):
    out_dtype = x.dtype
    cdt = compute_dtype or _compute_dtype(out_dtype)
    up = lambda t: None if t is None else t.to(cdt)  # noqa: E731
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = map(up, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    if lengths is not None:
        lengths = lengths.to(device=x.device, dtype=torch.int64)

    if cell == "lstm":
        def step(x_t, state):
            return lstm_cell(x_t, state[0], state[1], w_ih, w_hh, b_ih, b_hh, w_hr)
        y, (h_n, c_n) = _time_loop(step, x, (h0, c0), reverse, lengths)
        return y.to(out_dtype), h_n.to(out_dtype), c_n.to(out_dtype)

    cell_fn = {"gru": gru_cell, "rnn_tanh": rnn_tanh_cell, "rnn_relu": rnn_relu_cell}[cell]

    def step(x_t, state):
        return (cell_fn(x_t, state[0], w_ih, w_hh, b_ih, b_hh),)
    y, (h_n,) = _time_loop(step, x, (h0,), reverse, lengths)
    return y.to(out_dtype), h_n.to(out_dtype), None


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, reverse=False, lengths=None, *,
        compute_dtype=None):
    return _layer("lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths, compute_dtype)


def gru_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, reverse=False, lengths=None, *,
        compute_dtype=None):
    assert c0 is None and w_hr is None, "GRU has no cell state and no projection"
    return _layer("gru", x, h0, None, w_ih, w_hh, b_ih, b_hh, None, reverse, lengths, compute_dtype)


def rnn_tanh_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, reverse=False, lengths=None, *,
        compute_dtype=None):
    assert c0 is None and w_hr is None, "RNN has no cell state and no projection"
    return _layer("rnn_tanh", x, h0, None, w_ih, w_hh, b_ih, b_hh, None, reverse, lengths, compute_dtype)


def rnn_relu_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, reverse=False, lengths=None, *,
        compute_dtype=None):
    assert c0 is None and w_hr is None, "RNN has no cell state and no projection"
    return _layer("rnn_relu", x, h0, None, w_ih, w_hh, b_ih, b_hh, None, reverse, lengths, compute_dtype)


LAYERS = {"lstm": lstm_layer, "gru": gru_layer, "rnn_tanh": rnn_tanh_layer, "rnn_relu": rnn_relu_layer}


def rnn_layer(cell, x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, reverse=False, lengths=None, *,
              compute_dtype=None):
    """Dispatches by cell name to the layer functions above (same signature)."""
    return LAYERS[cell](x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths, compute_dtype=compute_dtype)


# ---------------------------------------------------------------------------------------------------
# Beyond torch.nn (issue #18): LayerNorm LSTM / GRU and zoneout, the spec of fusedrnn::rnn_layer_ext.
#
#   y, h_n, c_n = rnn_layer_ext(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight,
#                               ln_c_bias, zoneout_h, zoneout_c, reverse, lengths)
#
#   cell         "lstm" or "gru" (no projection)
#   ln_ih, ln_hh [G*H] gains of the layer norms of the input part W_ih x and of the recurrent part W_hh h,
#                or both None (no layer norm). The biases b_ih, b_hh are added after the norms and serve as
#                their shifts (as in haste's LayerNormLSTM / LayerNormGRU; a shift per norm would be
#                redundant with them). Each norm runs over the whole G*H row of one sequence, eps LN_EPS,
#                biased variance (torch.nn.functional.layer_norm).
#   ln_c_weight, ln_c_bias [H]
#                LSTM with layer norm only: the norm of the new cell state before its tanh,
#                h = o * tanh(LN(c) * ln_c_weight + ln_c_bias). The state carried on is c itself.
#   zoneout_h, zoneout_c [T, B, H] or None
#                keep-masks of zoneout (Krueger et al. 2016): where zoneout_h[t] != 0 the unit keeps its
#                previous value h_{t-1} instead of the new one (zoneout_c: the same for the LSTM's cell
#                state). The masks are drawn by the caller (fusedrnn.nn draws Bernoulli(p) in training and
#                passes None in eval); y[t] is the state h_t after zoneout.
#
# LSTM:  a = LN(W_ih x)*ln_ih + b_ih + LN(W_hh h)*ln_hh + b_hh -> i, f, g, o
#        c~ = f*c + i*g;  h~ = o * tanh(LN(c~)*ln_c_weight + ln_c_bias);  c' = zoneout(c~, c);  h' = zoneout(h~, h)
# GRU:   a_x = LN(W_ih x)*ln_ih + b_ih,  a_h = LN(W_hh h)*ln_hh + b_hh,  then PyTorch's reset-after GRU on
#        (a_x, a_h);  h' = zoneout(h~, h)
# Without norms and masks these are exactly lstm_cell / gru_cell. Lengths and reverse as in rnn_layer.
# ---------------------------------------------------------------------------------------------------
LN_EPS = 1e-5
EXT_CELLS = ("lstm", "gru")


def layer_norm_rows(v: Tensor, gain: Tensor, shift: Tensor | None = None) -> Tensor:
    """LayerNorm over the last dimension with biased variance and eps LN_EPS, times gain (plus shift)."""
    mean = v.mean(-1, keepdim=True)
    centred = v - mean
    var = (centred * centred).mean(-1, keepdim=True)
    out = centred * torch.rsqrt(var + LN_EPS) * gain
    return out if shift is None else out + shift


def _gate_parts(x, h, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh):
    """(input part, recurrent part) of the pre-activations, each normed (when ln_ih is given) and biased."""
    a_x, a_h = x @ w_ih.t(), h @ w_hh.t()
    if ln_ih is not None:
        a_x, a_h = layer_norm_rows(a_x, ln_ih), layer_norm_rows(a_h, ln_hh)
    if b_ih is not None:
        a_x, a_h = a_x + b_ih, a_h + b_hh
    return a_x, a_h


def ln_lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, ln_ih=None, ln_hh=None, ln_c_weight=None,
                 ln_c_bias=None):
    """One step of the (LayerNorm) LSTM before zoneout: returns (h~ [B, H], c~ [B, H])."""
    a_x, a_h = _gate_parts(x, h, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh)
    i, f, g, o = (a_x + a_h).chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    c_out = c_new if ln_c_weight is None else layer_norm_rows(c_new, ln_c_weight, ln_c_bias)
    return o * torch.tanh(c_out), c_new


def ln_gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, ln_ih=None, ln_hh=None):
    """One step of the (LayerNorm) GRU before zoneout: returns h~ [B, H]."""
    a_x, a_h = _gate_parts(x, h, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh)
    x_r, x_z, x_n = a_x.chunk(3, dim=-1)
    h_r, h_z, h_n = a_h.chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def zoneout(new: Tensor, previous: Tensor, keep: Tensor | None) -> Tensor:
    """The previous value where the keep-mask is nonzero, else the new one."""
    return new if keep is None else torch.where(keep != 0, previous, new)


def rnn_layer_ext(cell, x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, ln_ih=None, ln_hh=None, ln_c_weight=None,
                  ln_c_bias=None, zoneout_h=None, zoneout_c=None, reverse=False, lengths=None, *,
                  compute_dtype=None):
    """The spec of fusedrnn::rnn_layer_ext (section comment above). Returns (y, h_n, c_n or None)."""
    assert cell in EXT_CELLS, cell
    out_dtype = x.dtype
    cdt = compute_dtype or _compute_dtype(out_dtype)
    up = lambda t: None if t is None else t.to(cdt)  # noqa: E731
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias = map(
        up, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias))
    if lengths is not None:
        lengths = lengths.to(device=x.device, dtype=torch.int64)
    if cell == "lstm":
        def step(x_t, state, t):
            h, c = state
            h_new, c_new = ln_lstm_cell(x_t, h, c, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias)
            return (zoneout(h_new, h, None if zoneout_h is None else zoneout_h[t]),
                    zoneout(c_new, c, None if zoneout_c is None else zoneout_c[t]))
        y, (h_n, c_n) = _time_loop(step, x, (h0, c0), reverse, lengths, pass_time=True)
        return y.to(out_dtype), h_n.to(out_dtype), c_n.to(out_dtype)

    def step(x_t, state, t):
        h = state[0]
        h_new = ln_gru_cell(x_t, h, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh)
        return (zoneout(h_new, h, None if zoneout_h is None else zoneout_h[t]),)
    y, (h_n,) = _time_loop(step, x, (h0,), reverse, lengths, pass_time=True)
    return y.to(out_dtype), h_n.to(out_dtype), None

