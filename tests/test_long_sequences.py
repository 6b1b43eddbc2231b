"""Sequences past cuDNN's 65,535 steps (issue #18, long sequences; pytorch #133751): T = 70,000 forward and
backward, every cell, on the CPU backends, against the spec in float64.

The CPU kernels index with int64 throughout (csrc/cpu/rnn_layer.cpp: no int or int32 index arithmetic), so
T * B * W offsets cannot wrap; this test runs the cpu backend past cuDNN's limit against the reference backend.
Not run here: the Triton interpreter and the CUDA emulator (milliseconds a step: 70,000 would take minutes),
and torch's CPU kernels (backend aten: correct, but its fp64 forward+backward took 100-130 s per cell at this
length on the project's machine).
"""
from __future__ import annotations

import pytest
import torch

import fusedrnn
from fusedrnn import functional
from helpers import CELLS, make_layer_args

T_LONG = 70_000  # > 65,535
HAS_CPU = "cpu" in fusedrnn.available_backends("cpu")


@pytest.fixture(scope="module")
def spec_results():
    """The reference backend's outputs and gradients per cell, computed once (its loop takes seconds)."""
    out = {}
    for cell in CELLS:
        args = make_layer_args(cell, T=T_LONG, B=2, I=2, H=3, lengths=[T_LONG, T_LONG - 12_345], scale=0.5)
        # the reference backend: the spec's loop with its explicit BPTT backward (autograd through 70,000
        # steps of the spec's own graph would take minutes)
        with fusedrnn.use_backend("reference"):
            out[cell] = (args, _run(lambda: functional.rnn_layer(cell, **args), args))
    return out


def _run(fn, args):
    outs = [o for o in fn() if o is not None]
    names = [n for n in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh") if args.get(n) is not None]
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [args[n] for n in names], cot)
    return [o.detach() for o in outs] + list(grads)


def _assert_same(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        # fp64, 70,000 steps of contraction (weights scaled by 0.5): agreement to ~1e-12 relative
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=f"{what} result {i}")


@pytest.mark.skipif(not HAS_CPU, reason="the cpu backend is not built here")
@pytest.mark.parametrize("cell", CELLS)
def test_seventy_thousand_steps_cpu(cell, spec_results):
    """With lengths (one sequence ends 12,345 steps early), reverse-free, every output and gradient."""
    args, want = spec_results[cell]
    with fusedrnn.use_backend("cpu"):
        got = _run(lambda: functional.rnn_layer(cell, **args), args)
    _assert_same(got, want, cell)
    assert want[0][-1, 0].abs().max() > 0 and (want[0][-12_345:, 1] == 0).all()
