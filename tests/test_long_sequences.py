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


# ---------------------------------------------------------------------------------------------------------
# Offsets past 2^31 (int32 would wrap): the output y [T, B, H] of 2^31 + 2^23 elements
# ---------------------------------------------------------------------------------------------------------
def _mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return 0.0


T_HUGE, H_HUGE = 2 ** 28 + 2 ** 20, 8  # y: T * H = 2^31 + 2^23 elements, 8.6 GB in fp32; x 1.1 GB
NEED_GB = 13.0


def _wavy_input(T: int) -> torch.Tensor:
    """x_t = sin(t / 1000) + 0.5 sin(0.37 t): no period short enough that a wrapped offset reads the same value."""
    x = torch.empty(T, 1, 1)
    chunk = 2 ** 24
    for s in range(0, T, chunk):
        t = torch.arange(s, min(T, s + chunk), dtype=torch.float64)
        x[s:s + chunk, 0, 0] = (torch.sin(t / 1000) + 0.5 * torch.sin(0.37 * t)).float()
    return x


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CPU, reason="the cpu backend is not built here")
@pytest.mark.skipif(_mem_available_gb() < NEED_GB, reason=f"needs {NEED_GB} GB of free memory (y alone is 8.6 GB)")
@pytest.mark.parametrize("cell", ["lstm"])
def test_offsets_past_two_to_the_31_cpu(cell):
    """A forward whose output has more than 2^31 elements (T = 2^28 + 2^20 steps, B = 1, H = 8): the steps
    around the element 2^31 and the last ones against the spec. The recurrence contracts (weights scaled
    down), so the spec started 2,048 steps earlier from a zero state reaches the same values (to 1e-16 in
    fp64): a wrapped int32
    offset would write those steps elsewhere (or read another step's input) and fail the comparison."""
    torch.manual_seed(0)
    args = make_layer_args(cell, T=1, B=1, I=1, H=H_HUGE, scale=0.5, dtype=torch.float32, requires_grad=False)
    args["w_ih"], args["w_hh"] = args["w_ih"] * 3, args["w_hh"] * 0.3  # the input moves h, the past fades
    x = _wavy_input(T_HUGE)
    with torch.no_grad(), fusedrnn.use_backend("cpu"):
        y, h_n, c_n = functional.rnn_layer(cell, x, args["h0"], args["c0"], args["w_ih"], args["w_hh"],
                                           args["b_ih"], args["b_hh"])
    assert y.numel() > 2 ** 31
    warm = 2048
    for t_check in (2 ** 31 // H_HUGE, T_HUGE - 64):  # the step holding element 2^31, and the last steps
        t0 = t_check - warm
        zeros = torch.zeros(1, H_HUGE)
        with torch.no_grad(), fusedrnn.use_backend("reference"):
            want, _, _ = functional.rnn_layer(cell, x[t0:t_check + 64].double(), zeros.double(), zeros.double(),
                                              *(args[n].double() for n in ("w_ih", "w_hh", "b_ih", "b_hh")))
        got = y[t_check - 64:t_check + 64].double()
        torch.testing.assert_close(got, want[-128:], rtol=0, atol=2e-5, msg=f"steps around {t_check}")
        # every step differs from its neighbours by far more than the tolerance: a step written or read at a
        # wrapped offset cannot pass
        assert (want[-128:][1:] - want[-128:][:-1]).abs().amax(dim=(1, 2)).min() > 20 * 2e-5
    torch.testing.assert_close(h_n.double(), want[-1], rtol=0, atol=2e-5)
