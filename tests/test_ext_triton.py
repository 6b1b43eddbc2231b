"""The Triton row kernels of fusedrnn::rnn_layer_ext (fusedrnn/triton/rnn_ext.py, TritonRows) against
ReferenceRows, the same contract in PyTorch ops (fusedrnn/backends/ext.py).

On a machine without a GPU they run on CPU tensors in Triton's interpreter (conftest sets TRITON_INTERPRET=1),
where every helper call and tensor op costs Python time: small sizes, and the flag combinations spread over the
sizes instead of their full product.

Tolerance (the rule of tests/helpers.py): the truth is ReferenceRows in fp64 on the same inputs; the kernels
at dtype d may be off by FACTOR times the error ReferenceRows itself makes at d (float32 compute for fp32,
fp16 and bf16 inputs) plus a few units in the last place of each output's dtype. What the contract fixes
exactly -- invalid rows (state kept, y = 0, gradients passed through, d_ax = d_ah = 0, acc untouched) and the
acc blocks of absent parameters -- must match bit for bit.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from fusedrnn.backends.ext import ReferenceRows, acc_dtype, ext_acc_width, ext_backward, ext_forward, row_kernels
from fusedrnn.reference import GATES
from helpers import FACTOR, ULP_FLOOR, interpreting_triton, max_error

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting_triton():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from fusedrnn.triton.rnn_ext import MAX_HIDDEN, TritonRows  # noqa: E402  (after the interpreter check)

# a few units in the last place of each output dtype, for outputs the dtype's reference run gets exactly right
FLOOR = {torch.float64: 64 * 2.0 ** -52, torch.float32: 16 * 2.0 ** -23, **ULP_FLOOR}

FLAGS = list(itertools.product(("lstm", "gru"), (True, False), (True, False), (True, False), (True, False)))
FLAG_IDS = [f"{c}-{'ln' if ln else 'noln'}-{'zo' if zo else 'nozo'}-{'bias' if b else 'nobias'}-"
            f"{'valid' if v else 'all'}" for c, ln, zo, b, v in FLAGS]
SIZES = [(1, 1), (3, 63), (1, 129), (3, 1), (1, 63), (3, 129)]  # (B, H)


def _size(index: int, valid: bool):
    """(B, H) of flag combination `index`: every size in turn; three rows where some are invalid."""
    B, H = SIZES[index % len(SIZES)]
    return (3 if valid else B), H


def make_rows(cell, B, H, ln, zoneout, bias, valid, seed=0):
    """fp64 arguments of the row kernels (module doc of backends/ext.py), ax/ah as strided slices of a
    workspace-like row as the driver passes them, and the backward's gradients and acc."""
    g = torch.Generator().manual_seed(seed)
    G = GATES[cell]
    GH = G * H
    lstm = cell == "lstm"

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    def keep():
        return (torch.rand(B, H, generator=g, dtype=torch.float64) < 0.3).double()

    ws = rnd(B, 2 * GH + H)
    args = dict(cell=cell, ax=ws[:, :GH], ah=ws[:, GH:2 * GH],
                b_ih=rnd(GH, scale=0.5) if bias else None, b_hh=rnd(GH, scale=0.5) if bias else None,
                ln_ih=1 + rnd(GH, scale=0.3) if ln else None, ln_hh=1 + rnd(GH, scale=0.3) if ln else None,
                ln_c_weight=1 + rnd(H, scale=0.3) if ln and lstm else None,
                ln_c_bias=rnd(H, scale=0.3) if ln and lstm else None,
                h_prev=rnd(B, H, scale=0.5), c_prev=rnd(B, H) if lstm else None,
                zoneout_h=keep() if zoneout else None, zoneout_c=keep() if zoneout and lstm else None,
                valid=torch.tensor([b % 2 == 0 for b in range(B)]) if valid else None)
    grads = dict(grad_h=rnd(B, H), grad_y=rnd(B, H), grad_c=rnd(B, H) if lstm else None,
                 acc=rnd(B, ext_acc_width(cell, H)))
    return args, grads


def cast(d: dict, dtype, state_dtype=None):
    """Floating tensors to dtype (grad_h, grad_c, acc: to state_dtype), on DEVICE; views stay views."""
    out = {}
    for k, t in d.items():
        if isinstance(t, torch.Tensor):
            if t.is_floating_point():
                t = t.to(state_dtype if state_dtype is not None and k in ("grad_h", "grad_c", "acc") else dtype)
            t = t.to(DEVICE)
        out[k] = t
    return out


def run_rows(rows, args, grads):
    acc = grads["acc"].clone()
    fwd = rows.forward_rows(**args)
    bwd = rows.backward_rows(**args, grad_h=grads["grad_h"], grad_y=grads["grad_y"], grad_c=grads["grad_c"], acc=acc)
    return dict(zip(("h_new", "c_new", "y", "d_ax", "d_ah", "grad_h_prev", "grad_c_prev"), fwd + bwd), acc=acc)


def assert_close(name, fast, truth, native):
    """fast within FACTOR x native's error of the fp64 truth, plus FLOOR ulp (relative to max(1, |truth|))."""
    assert fast.shape == truth.shape, f"{name}: shape {list(fast.shape)} != {list(truth.shape)}"
    assert fast.dtype == native.dtype, f"{name}: dtype {fast.dtype} != reference {native.dtype}"
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    tol = FACTOR * max_error(native, truth) + FLOOR[fast.dtype] * scale
    err = max_error(fast, truth)
    assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g} ({fast.dtype})"


def check_rows(cell, B, H, ln, zoneout, bias, valid, dtype, seed=0):
    args64, grads64 = make_rows(cell, B, H, ln, zoneout, bias, valid, seed)
    args, grads = cast(args64, dtype), cast(grads64, dtype, acc_dtype(dtype))
    before = {k: t.clone() for k, t in list(args.items()) + list(grads.items()) if isinstance(t, torch.Tensor)}
    fast = run_rows(TritonRows, args, grads)
    for k, t in before.items():  # inputs (acc included: run_rows hands over a copy) are left as they were
        assert torch.equal(t, (args | grads)[k]), f"{k} was modified"
    native = run_rows(ReferenceRows, args, grads)
    truth = run_rows(ReferenceRows, cast(args, torch.float64), cast(grads, torch.float64))
    for name in fast:
        assert_close(name, fast[name], truth[name], native[name])

    # exact by contract: absent parameters' acc blocks, invalid rows
    GH = GATES[cell] * H
    blocks = {"b_ih": (0, GH), "b_hh": (GH, GH), "ln_ih": (2 * GH, GH), "ln_hh": (3 * GH, GH),
              "ln_c_weight": (4 * GH, H), "ln_c_bias": (4 * GH + H, H)}
    for k, (lo, n) in blocks.items():
        if k in args and args[k] is None and lo < fast["acc"].shape[1]:
            assert torch.equal(fast["acc"][:, lo:lo + n], grads["acc"][:, lo:lo + n]), f"acc block {k} changed"
    if valid:
        off = ~args["valid"]
        assert off.any() or B == 1
        assert torch.equal(fast["h_new"][off], args["h_prev"][off])
        assert torch.equal(fast["y"][off], torch.zeros_like(fast["y"][off]))
        assert torch.equal(fast["d_ax"][off], torch.zeros_like(fast["d_ax"][off]))
        assert torch.equal(fast["d_ah"][off], torch.zeros_like(fast["d_ah"][off]))
        assert torch.equal(fast["grad_h_prev"][off], grads["grad_h"][off])
        assert torch.equal(fast["acc"][off], grads["acc"][off])
        if cell == "lstm":
            assert torch.equal(fast["c_new"][off], args["c_prev"][off])
            assert torch.equal(fast["grad_c_prev"][off], grads["grad_c"][off])


# ---------------------------------------------------------------------------------------------------------
# The row kernels: every flag combination in fp32, spread over the sizes; fp64; fp16 / bf16
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", range(len(FLAGS)), ids=FLAG_IDS)
def test_rows_fp32(index):
    cell, ln, zoneout, bias, valid = FLAGS[index]
    B, H = _size(index, valid)
    check_rows(cell, B, H, ln, zoneout, bias, valid, torch.float32, seed=index)


@pytest.mark.parametrize("index", range(0, len(FLAGS), 3), ids=FLAG_IDS[::3])
def test_rows_fp64(index):
    cell, ln, zoneout, bias, valid = FLAGS[index]
    B, H = _size(index + 1, valid)
    check_rows(cell, B, H, ln, zoneout, bias, valid, torch.float64, seed=100 + index)


HALF = [(c, on, H) for c in ("lstm", "gru") for on, H in ((True, 63), (False, 129))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cell,on,H", HALF, ids=[f"{c}-{'all' if on else 'none'}-H{H}" for c, on, H in HALF])
def test_rows_half(cell, on, H, dtype):
    """Every flag on (norms, zoneout, bias, some invalid rows) or off."""
    check_rows(cell, 3, H, on, on, on, on, dtype, seed=7)


def test_all_rows_invalid_and_empty():
    args, grads = (cast(d, torch.float32) for d in make_rows("gru", 2, 5, True, False, True, True))
    args["valid"] = torch.zeros(2, dtype=torch.bool, device=DEVICE)
    out = run_rows(TritonRows, args, grads)
    assert torch.equal(out["h_new"], args["h_prev"]) and not out["y"].any()
    assert not out["d_ax"].any() and not out["d_ah"].any()
    assert torch.equal(out["acc"], grads["acc"]) and torch.equal(out["grad_h_prev"], grads["grad_h"])
    for B, H in ((0, 4), (2, 0)):  # nothing to launch
        args, grads = (cast(d, torch.float32) for d in make_rows("lstm", B, H, True, True, True, True))
        out = run_rows(TritonRows, args, grads)
        assert out["h_new"].shape == (B, H) and out["c_new"].shape == (B, H) and out["y"].shape == (B, H)
        assert out["d_ax"].shape == (B, 4 * H) and out["grad_c_prev"].shape == (B, H)
        assert torch.equal(out["acc"], grads["acc"])


# ---------------------------------------------------------------------------------------------------------
# The whole op through the shared driver: ext_forward / ext_backward with TritonRows vs ReferenceRows
# ---------------------------------------------------------------------------------------------------------
def make_layer(cell, T, B, I, H, ln, zoneout, bias, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = GATES[cell]
    lstm = cell == "lstm"
    k = H ** -0.5

    def uni(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * k

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    def keep():
        return (torch.rand(T, B, H, generator=g, dtype=torch.float64) < 0.25).double()

    return dict(cell=cell, x=rnd(T, B, I), h0=rnd(B, H, scale=0.5), c0=rnd(B, H, scale=0.5) if lstm else None,
                w_ih=uni(G * H, I), w_hh=uni(G * H, H), b_ih=uni(G * H) if bias else None,
                b_hh=uni(G * H) if bias else None, ln_ih=1 + rnd(G * H, scale=0.2) if ln else None,
                ln_hh=1 + rnd(G * H, scale=0.2) if ln else None,
                ln_c_weight=1 + rnd(H, scale=0.2) if ln and lstm else None,
                ln_c_bias=rnd(H, scale=0.2) if ln and lstm else None,
                zoneout_h=keep() if zoneout else None, zoneout_c=keep() if zoneout and lstm else None,
                lengths=None if lengths is None else torch.tensor(lengths))


def run_layer(rows, layer, cotangents, reverse):
    y, h_n, c_n, ws = ext_forward(rows, **layer, reverse=reverse, need_workspace=True)
    grads = ext_backward(rows, **layer, reverse=reverse, y=y, workspace=ws, **cotangents)
    return (y, h_n, c_n) + tuple(grads)


LAYERS = {  # cell, T, B, I, H, ln, zoneout, bias, lengths, reverse
    "lstm-all-rev-lengths": ("lstm", 4, 3, 5, 9, True, True, True, [4, 1, 3], True),
    "lstm-plain-lengths": ("lstm", 4, 2, 3, 9, False, False, False, [2, 4], False),
    "gru-all-rev-lengths": ("gru", 4, 2, 5, 9, True, True, True, [0, 4], True),
    "gru-ln": ("gru", 4, 2, 3, 9, True, False, True, None, False),
}
OUT_NAMES = ("y", "h_n", "c_n", "grad x", "grad h0", "grad c0", "grad w_ih", "grad w_hh", "grad b_ih", "grad b_hh",
             "grad ln_ih", "grad ln_hh", "grad ln_c_weight", "grad ln_c_bias")


@pytest.mark.parametrize("case", list(LAYERS))
def test_layer_through_driver(case):
    cell, T, B, I, H, ln, zoneout, bias, lengths, reverse = LAYERS[case]
    layer64 = make_layer(cell, T, B, I, H, ln, zoneout, bias, lengths)
    g = torch.Generator().manual_seed(1)
    cot64 = dict(grad_y=torch.randn(T, B, H, generator=g, dtype=torch.float64),
                 grad_h_n=torch.randn(B, H, generator=g, dtype=torch.float64),
                 grad_c_n=torch.randn(B, H, generator=g, dtype=torch.float64) if cell == "lstm" else None)

    assert row_kernels("triton") is TritonRows
    layer32, cot32 = cast(layer64, torch.float32), cast(cot64, torch.float32)
    fast = run_layer(TritonRows, layer32, cot32, reverse)
    native = run_layer(ReferenceRows, layer32, cot32, reverse)
    truth = run_layer(ReferenceRows, cast(layer64, torch.float64), cast(cot64, torch.float64), reverse)
    assert len(fast) == len(OUT_NAMES)
    for name, f, n, t in zip(OUT_NAMES, fast, native, truth):
        assert_close(f"{case}: {name}", f, t, n)


# ---------------------------------------------------------------------------------------------------------
# Availability and refusals
# ---------------------------------------------------------------------------------------------------------
def test_available_on_this_device():
    assert TritonRows.name == "triton"
    assert TritonRows.unavailable_reason(torch.device(DEVICE)) is None
    assert "got meta" in TritonRows.unavailable_reason(torch.device("meta"))


def test_unsupported_reasons():
    for cell in ("lstm", "gru"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            limit = MAX_HIDDEN[dtype.itemsize]
            assert TritonRows.unsupported_reason(cell, dtype, 1) is None
            assert TritonRows.unsupported_reason(cell, dtype, limit) is None
            why = TritonRows.unsupported_reason(cell, dtype, limit + 1)
            assert why is not None and str(limit) in why and "registers" in why
    assert MAX_HIDDEN[4] == MAX_HIDDEN[2] == 1024 and MAX_HIDDEN[8] == 512
    assert "rnn_tanh" in TritonRows.unsupported_reason("rnn_tanh", torch.float32, 8)
    assert "int32" in TritonRows.unsupported_reason("lstm", torch.int32, 8)
    args, _ = make_rows("gru", 1, MAX_HIDDEN[4] + 1, False, False, False, False)
    with pytest.raises(RuntimeError, match="registers"):
        TritonRows.forward_rows(**cast(args, torch.float32))
