"""Backend "cpu" of fusedrnn::rnn_layer_ext: the row kernels of csrc/cpu/rnn_ext.cpp (fusedrnn.backends.ext_cpu)
against the contract in PyTorch ops, backends.ext.ReferenceRows.

- Every combination of cell x layer norm x zoneout x bias x valid rows, each at one of the sizes B in {1, 3}, H in
  {1, 63, 129}: every output of forward_rows and backward_rows and the accumulator, in float64 (to rounding) and
  float32 (within FACTOR times the error ReferenceRows itself makes in float32, tests/helpers.py's rule), and
  a few in float16 / bfloat16 (computed in float32).
- The row kernels under the driver: ext_forward / ext_backward with CpuRows against ReferenceRows, both cells,
  T=5, forward and reverse, with lengths.
- Rows split over threads, strided operands, inputs left as they were, bad arguments raising.
- The same tests in subprocesses forced to each other instruction-set level this CPU runs (FUSEDRNN_CPU_ISA).
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedrnn.backends.ext import ReferenceRows, acc_dtype, ext_acc_width, ext_backward, ext_forward
from fusedrnn.backends.ext_cpu import CpuRows
from helpers import FACTOR, ULP_FLOOR

_UNAVAILABLE = CpuRows.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))

FLOAT32_ULP_FLOOR = 8 * 2.0 ** -24  # outputs the native float32 run gets exactly right still round in the kernels
FLOAT64_TOL = 1e-12
ROW_OUTPUTS = ("h_new", "c_new", "y", "d_ax", "d_ah", "grad_h_prev", "grad_c_prev", "acc")


# ---------------------------------------------------------------------------------------------------------
# Arguments of one step
# ---------------------------------------------------------------------------------------------------------
def step_args(cell, B, H, *, ln, lnc, zoneout, bias, valid, seed=0):
    """(forward arguments, extra backward arguments) of one step in float64, as ext_forward / ext_backward
    pass them. ln_c_* follow `lnc` (LSTM only). Masks keep ~30% of the units, with nonzero values other than 1."""
    g = torch.Generator().manual_seed(seed)
    G = 4 if cell == "lstm" else 3
    GH = G * H
    lstm = cell == "lstm"

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    def mask():
        keep = torch.rand(B, H, generator=g, dtype=torch.float64) < 0.3
        return keep * torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)[torch.randint(0, 3, (B, H), generator=g)]

    fwd = dict(
        ax=rnd(B, GH, scale=2.0, shift=0.5), ah=rnd(B, GH),
        b_ih=rnd(GH, scale=0.3) if bias else None, b_hh=rnd(GH, scale=0.3) if bias else None,
        ln_ih=rnd(GH, scale=0.2, shift=1.0) if ln else None, ln_hh=rnd(GH, scale=0.2, shift=1.0) if ln else None,
        ln_c_weight=rnd(H, scale=0.2, shift=1.0) if lstm and lnc else None,
        ln_c_bias=rnd(H, scale=0.2) if lstm and lnc else None,
        h_prev=rnd(B, H, scale=0.5), c_prev=rnd(B, H) if lstm else None,
        zoneout_h=mask() if zoneout else None, zoneout_c=mask() if zoneout and lstm else None,
        valid=(torch.arange(B) % 2 == 1) if valid else None)
    bwd = dict(grad_h=rnd(B, H), grad_y=rnd(B, H), grad_c=rnd(B, H) if lstm else None,
               acc=rnd(B, ext_acc_width(cell, H)))
    return fwd, bwd


def cast(args: dict, dtype) -> dict:
    """Floating tensors to dtype; the backward's acc-dtype ones (grad_h, grad_c, acc) to acc_dtype(dtype)."""
    out = {}
    for name, t in args.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.to(acc_dtype(dtype) if name in ("grad_h", "grad_c", "acc") else dtype)
        out[name] = t
    return out


def run_rows(rows, cell, fwd: dict, bwd: dict) -> dict:
    """Every output of one forward_rows and one backward_rows call (the backward's acc: after it)."""
    bwd = dict(bwd, acc=bwd["acc"].clone())
    h_new, c_new, y = rows.forward_rows(cell, **fwd)
    d_ax, d_ah, grad_h_prev, grad_c_prev = rows.backward_rows(cell, **fwd, **bwd)
    return dict(zip(ROW_OUTPUTS, (h_new, c_new, y, d_ax, d_ah, grad_h_prev, grad_c_prev, bwd["acc"])))


def max_error(a, b) -> float:
    return 0.0 if a.numel() == 0 else (a.double() - b.double()).abs().max().item()


def scale_of(t) -> float:
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


def compare_rows(cell, fwd64, bwd64, dtype, label=""):
    """CpuRows at dtype against ReferenceRows: to rounding in float64, else within the tolerance rule of
    tests/helpers.py (FACTOR times ReferenceRows' own error at dtype, plus a floor)."""
    fwd, bwd = cast(fwd64, dtype), cast(bwd64, dtype)
    got = run_rows(CpuRows, cell, fwd, bwd)
    # the exact reference: the same (rounded) inputs, computed in float64
    want = run_rows(ReferenceRows, cell, cast(fwd, torch.float64), cast(bwd, torch.float64))
    native = run_rows(ReferenceRows, cell, fwd, bwd) if dtype != torch.float64 else None
    for name in ROW_OUTPUTS:
        g, w = got[name], want[name]
        expect_dtype = acc_dtype(dtype) if name in ("grad_h_prev", "grad_c_prev", "acc") else dtype
        assert g.dtype == expect_dtype, f"{label} {name}: dtype {g.dtype}, want {expect_dtype}"
        assert g.shape == w.shape, f"{label} {name}: shape {list(g.shape)}, want {list(w.shape)}"
        scale = scale_of(w)
        if dtype == torch.float64:
            tol = FLOAT64_TOL * scale
        else:
            floor = FLOAT32_ULP_FLOOR if g.dtype == torch.float32 else ULP_FLOOR[g.dtype]
            tol = FACTOR * max_error(native[name], w) + floor * scale
        err = max_error(g, w)
        assert err <= tol, f"{label} {name}: max error {err:.3g} > {tol:.3g} ({dtype})"


# ---------------------------------------------------------------------------------------------------------
# Every combination, one size each
# ---------------------------------------------------------------------------------------------------------
SIZES = [(1, 1), (3, 63), (1, 129), (3, 1), (1, 63), (3, 129)]
COMBOS = list(itertools.product(("lstm", "gru"), (True, False), (True, False), (True, False), (False, True)))
CASES = [(*combo, *SIZES[i % len(SIZES)]) for i, combo in enumerate(COMBOS)]


def case_id(case):
    cell, ln, zoneout, bias, valid, B, H = case
    return (f"{cell}-{'ln' if ln else 'noln'}-{'zo' if zoneout else 'nozo'}-{'bias' if bias else 'nobias'}-"
            f"{'valid' if valid else 'allvalid'}-B{B}-H{H}")


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_rows_match_reference(case):
    cell, ln, zoneout, bias, valid, B, H = case
    fwd, bwd = step_args(cell, B, H, ln=ln, lnc=ln, zoneout=zoneout, bias=bias, valid=valid, seed=B * 1000 + H)
    for dtype in (torch.float64, torch.float32):
        compare_rows(cell, fwd, bwd, dtype, case_id(case))


def test_every_size_and_combination_covered():
    assert {(B, H) for *_, B, H in CASES} == {(B, H) for B in (1, 3) for H in (1, 63, 129)}
    assert len({c[:5] for c in CASES}) == 2 * 2 * 2 * 2 * 2


@pytest.mark.parametrize("ln, lnc", [(True, False), (False, True)], ids=["ln-without-lnc", "lnc-without-ln"])
def test_lstm_norms_apart(ln, lnc):
    """The input norms and the norm of c are separate parts: either one alone."""
    fwd, bwd = step_args("lstm", 3, 63, ln=ln, lnc=lnc, zoneout=True, bias=True, valid=True, seed=7)
    for dtype in (torch.float64, torch.float32):
        compare_rows("lstm", fwd, bwd, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_half_inputs_computed_in_float32(cell, dtype):
    fwd, bwd = step_args(cell, 3, 63, ln=True, lnc=True, zoneout=True, bias=True, valid=True, seed=3)
    compare_rows(cell, fwd, bwd, dtype)


def test_rows_split_over_threads():
    """Enough rows that at::parallel_for splits them: the same numbers as one thread, and as the reference."""
    fwd, bwd = step_args("lstm", 40, 96, ln=True, lnc=True, zoneout=True, bias=True, valid=True, seed=11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_rows(CpuRows, "lstm", fwd, bwd)
        torch.set_num_threads(max(2, before))
        many = run_rows(CpuRows, "lstm", fwd, bwd)
    finally:
        torch.set_num_threads(before)
    for name in ROW_OUTPUTS:
        assert torch.equal(one[name], many[name]), name
    compare_rows("lstm", fwd, bwd, torch.float64)


def test_strided_operands():
    """ax / ah as slices of a wider tensor (the driver passes workspace rows), a transposed h_prev and acc with a
    column stride: the same numbers as contiguous operands; acc updated in place."""
    cell, B, H = "gru", 3, 63
    fwd, bwd = step_args(cell, B, H, ln=True, lnc=False, zoneout=True, bias=True, valid=True, seed=5)
    want = run_rows(CpuRows, cell, fwd, bwd)
    wide = torch.zeros(B, 3 * 3 * H + 5, dtype=torch.float64)
    wide[:, 1:1 + 3 * H] = fwd["ax"]
    wide[:, 2 + 3 * H:2 + 6 * H] = fwd["ah"]
    strided = dict(fwd, ax=wide[:, 1:1 + 3 * H], ah=wide[:, 2 + 3 * H:2 + 6 * H],
                   h_prev=fwd["h_prev"].t().contiguous().t())
    assert not strided["ax"].is_contiguous()
    acc_wide = torch.zeros(B, 2 * bwd["acc"].shape[1], dtype=torch.float64)
    acc_view = acc_wide[:, ::2]
    acc_view.copy_(bwd["acc"])
    h_new, c_new, y = CpuRows.forward_rows(cell, **strided)
    outs = CpuRows.backward_rows(cell, **strided, **dict(bwd, acc=acc_view))
    for name, got in zip(ROW_OUTPUTS, (h_new, c_new, y, *outs, acc_view)):
        assert torch.equal(got, want[name]), name
    assert torch.equal(acc_wide[:, 1::2], torch.zeros_like(acc_view))


def test_inputs_not_modified_and_absent_acc_blocks_kept():
    for cell in ("lstm", "gru"):
        fwd, bwd = step_args(cell, 3, 63, ln=False, lnc=False, zoneout=True, bias=False, valid=True, seed=9)
        before = {k: v.clone() for k, v in {**fwd, **bwd}.items() if isinstance(v, torch.Tensor)}
        acc = bwd["acc"].clone()
        CpuRows.forward_rows(cell, **fwd)
        CpuRows.backward_rows(cell, **fwd, **dict(bwd, acc=acc))
        for k, v in before.items():
            assert torch.equal({**fwd, **bwd}[k], v), f"{cell}: {k} was modified"
        assert torch.equal(acc, bwd["acc"]), f"{cell}: without biases and norms every acc block stays"


def test_empty_batch():
    for cell in ("lstm", "gru"):
        fwd, bwd = step_args(cell, 0, 5, ln=True, lnc=True, zoneout=True, bias=True, valid=True)
        got = run_rows(CpuRows, cell, fwd, bwd)
        want = run_rows(ReferenceRows, cell, fwd, bwd)
        for name in ROW_OUTPUTS:
            assert got[name].shape == want[name].shape, name


# ---------------------------------------------------------------------------------------------------------
# Under the driver
# ---------------------------------------------------------------------------------------------------------
def layer_args(cell, T, B, I, H, seed):
    g = torch.Generator().manual_seed(seed)
    G = 4 if cell == "lstm" else 3
    lstm = cell == "lstm"

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    return dict(x=rnd(T, B, I), h0=rnd(B, H, scale=0.5), c0=rnd(B, H) if lstm else None,
                w_ih=rnd(G * H, I, scale=I ** -0.5), w_hh=rnd(G * H, H, scale=H ** -0.5),
                b_ih=rnd(G * H, scale=0.1), b_hh=rnd(G * H, scale=0.1),
                ln_ih=rnd(G * H, scale=0.1, shift=1.0), ln_hh=rnd(G * H, scale=0.1, shift=1.0),
                ln_c_weight=rnd(H, scale=0.1, shift=1.0) if lstm else None,
                ln_c_bias=rnd(H, scale=0.1) if lstm else None,
                zoneout_h=(torch.rand(T, B, H, generator=g) < 0.2).double(),
                zoneout_c=(torch.rand(T, B, H, generator=g) < 0.2).double() if lstm else None)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_driver_with_cpu_rows(cell, reverse):
    T, B, I, H = 5, 3, 7, 33
    args = layer_args(cell, T, B, I, H, seed=21)
    lengths = torch.tensor([5, 2, 4])
    order = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "ln_ih", "ln_hh", "ln_c_weight", "ln_c_bias",
             "zoneout_h", "zoneout_c")
    g = torch.Generator().manual_seed(22)
    grad_y = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    grad_h_n = torch.randn(B, H, generator=g, dtype=torch.float64)
    grad_c_n = torch.randn(B, H, generator=g, dtype=torch.float64) if cell == "lstm" else None
    results = {}
    for rows in (CpuRows, ReferenceRows):
        positional = [args[k] for k in order]
        y, h_n, c_n, ws = ext_forward(rows, cell, *positional, lengths, reverse, True)
        grads = ext_backward(rows, cell, *positional, lengths, reverse, y, ws, grad_y, grad_h_n, grad_c_n)
        results[rows.name] = (y, h_n, c_n, ws, *grads)
    names = ("y", "h_n", "c_n", "workspace", "grad x", "grad h0", "grad c0", "grad w_ih", "grad w_hh", "grad b_ih",
             "grad b_hh", "grad ln_ih", "grad ln_hh", "grad ln_c_weight", "grad ln_c_bias")
    for name, got, want in zip(names, results["cpu"], results["reference"]):
        assert got.shape == want.shape, name
        assert max_error(got, want) <= FLOAT64_TOL * scale_of(want), f"{name}: {max_error(got, want):.3g}"


# ---------------------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------------------
def _bad_calls():
    fwd, bwd = step_args("lstm", 2, 4, ln=True, lnc=True, zoneout=True, bias=True, valid=True)
    gfwd, gbwd = step_args("gru", 2, 4, ln=True, lnc=False, zoneout=True, bias=True, valid=True)
    f = lambda **kw: ("forward", "lstm", dict(fwd, **kw), None)  # noqa: E731
    b = lambda **kw: ("backward", "lstm", fwd, dict(bwd, **kw))  # noqa: E731
    return [
        ("cell", ("forward", "rnn_tanh", fwd, None)),
        ("ax", f(ax=fwd["ax"][0])),
        ("ax", f(ax=fwd["ax"].int(), ah=fwd["ah"].int())),
        ("ax", f(ax=fwd["ax"][:, :-1], ah=fwd["ah"][:, :-1])),
        ("ah", f(ah=fwd["ah"].float())),
        ("ah", f(ah=fwd["ah"][:1])),
        ("b_hh", f(b_hh=None)),
        ("b_ih", f(b_ih=fwd["b_ih"][:-1])),
        ("ln_hh", f(ln_hh=fwd["ln_hh"].float())),
        ("ln_c_bias", f(ln_c_bias=None)),
        ("ln_c_weight", f(ln_c_weight=fwd["ln_c_weight"][:-1])),
        ("h_prev", f(h_prev=fwd["h_prev"][:, :-1])),
        ("c_prev", f(c_prev=None)),
        ("zoneout_h", f(zoneout_h=fwd["zoneout_h"].float())),
        ("zoneout_c", f(zoneout_c=fwd["zoneout_c"][:1])),
        ("valid", f(valid=fwd["valid"].long())),
        ("valid", f(valid=fwd["valid"][:1])),
        ("c_prev", ("forward", "gru", dict(gfwd, c_prev=fwd["c_prev"]), None)),
        ("ln_c_weight", ("forward", "gru", dict(gfwd, ln_c_weight=fwd["ln_c_weight"], ln_c_bias=fwd["ln_c_bias"]),
                         None)),
        ("grad_c", ("backward", "gru", gfwd, dict(gbwd, grad_c=bwd["grad_c"]))),
        ("grad_h", b(grad_h=bwd["grad_h"].float())),
        ("grad_y", b(grad_y=bwd["grad_y"][:, :-1])),
        ("grad_c", b(grad_c=None)),
        ("acc", b(acc=bwd["acc"][:, :-1])),
        ("acc", b(acc=bwd["acc"].float())),
    ]


BAD = _bad_calls()


@pytest.mark.parametrize("name, call", BAD, ids=[f"{i}-{n}" for i, (n, _) in enumerate(BAD)])
def test_bad_arguments_raise(name, call):
    which, cell, fwd, bwd = call
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        if which == "forward":
            CpuRows.forward_rows(cell, **fwd)
        else:
            CpuRows.backward_rows(cell, **fwd, **bwd)


def test_provider_reasons():
    assert CpuRows.unavailable_reason(torch.device("cpu")) is None
    assert "CPU" in CpuRows.unavailable_reason(torch.device("meta"))
    assert CpuRows.unsupported_reason("lstm", torch.float32, 64) is None
    assert CpuRows.unsupported_reason("gru", torch.bfloat16, 64) is None
    assert CpuRows.unsupported_reason("rnn_tanh", torch.float32, 64)
    assert CpuRows.unsupported_reason("lstm", torch.int32, 64)


# ---------------------------------------------------------------------------------------------------------
# Instruction-set levels
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["avx512", "avx2", "baseline"])
def test_at_isa_level(level):
    """This file in a process forced to `level` (the rest of it runs at the machine's best level)."""
    levels = list(torch.ops.fusedrnn.cpu_isa_levels())
    if level not in levels:
        pytest.skip(f"this CPU cannot run {level}")
    if level == levels[0] and os.environ.get("FUSEDRNN_CPU_ISA", "auto") in ("", "auto"):
        pytest.skip(f"{level} is this CPU's best level: the tests above ran at it")
    if os.environ.get("FUSEDRNN_CPU_ISA", "auto") not in ("", "auto"):
        pytest.skip("already a forced-level run")
    here = Path(__file__)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here), "-k", "not test_at_isa_level"]
    out = subprocess.run(cmd, env=dict(os.environ, FUSEDRNN_CPU_ISA=level), capture_output=True, text=True,
                         timeout=300, cwd=here.parent.parent)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0, f"{level}: {summary}\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}"
    assert re.search(r"\d+ passed", summary) and "failed" not in summary and "skipped" not in summary, summary
