"""The CPU backend's thread team (csrc/cpu/rnn_layer.cpp, StepSlice): the recurrence splits over threads by
hidden units (barrier per step, double-buffered h) or by batch rows (no barrier). Each split, with uneven
parts (3 threads), projection, lengths and reverse, against the fp64 reference, outputs and every gradient."""
from __future__ import annotations

import os

import pytest
import torch
import fusedrnn
from fusedrnn import functional

from helpers import (CELLS, assert_close_to_reference, cast_args, check_inputs_not_modified, compare_with_reference,
                     make_layer_args, outputs_and_grads, packed_fast, packed_layer_args, packed_spec,
                     run_and_grad)

pytestmark = pytest.mark.skipif(fusedrnn.extension_error() is not None, reason="needs the C++ extension")


def plan(cell, B, H, H_out, proj, dtype):
    return list(torch.ops.fusedrnn.cpu_loop_plan(cell, B, H, H_out, proj, dtype == torch.float64))


@pytest.fixture
def threads(request, monkeypatch):
    """torch's thread count for the test; teams may be larger than this machine's cores (3 threads give
    uneven parts), which they are not by default."""
    monkeypatch.setenv("FUSEDRNN_CPU_TEAM_MAX", "64")
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_teams_never_exceed_the_cores(monkeypatch):
    """More threads than cores: a team meets at a barrier every step, so it stays at the core count."""
    monkeypatch.delenv("FUSEDRNN_CPU_TEAM_MAX", raising=False)
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    torch.set_num_threads(cores + 2)
    try:
        assert plan("lstm", 64, 1024, 1024, False, torch.float32)[0] == cores
    finally:
        torch.set_num_threads(before)


def on_cpu(cell):
    """run_fast for compare_with_reference: the layer on the cpu backend."""
    def run(args):
        with fusedrnn.use_backend("cpu"):
            return run_and_grad(lambda **a: functional.rnn_layer(cell, **a), args)
    return run


def check_cpu_against_reference(cell, args):
    """The cpu backend's outputs and every gradient against the fp64 spec on the same values."""
    compare_with_reference(cell, cast_args(args, torch.float64), args["x"].dtype, on_cpu(cell))


# (T, B, H, proj): units split (fp64 panels are 16 units wide: H=97 gives 7 blocks, proj 37 gives 3); rows
# split because H=16 (or H_out=12) is one block, or because every thread gets 8 rows of small weights. The
# input projection runs in chunks of 64 // B steps: T=37 gives chunks of 16, 16, 5 (B=4) and 21, 16 (B=3).
SPLITS = {"units": (37, 4, 97, 0), "units_proj": (37, 3, 70, 37), "rows": (6, 130, 16, 0),
          "rows_preferred": (9, 24, 40, 0), "rows_proj": (7, 20, 40, 12)}  # proj 12: one block of H_out
CASES = [(cell, split) for cell in CELLS for split in SPLITS if cell == "lstm" or not SPLITS[split][3]]


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("cell,split", CASES)
@pytest.mark.parametrize("lengths,reverse", [(False, False), (True, True), (True, False)])
def test_team_split_matches_reference(cell, split, threads, lengths, reverse):
    T, B, H, proj = SPLITS[split]
    expected_plan = [1, 0] if threads == 1 else [threads, 0 if split.startswith("rows") else 1]
    assert plan(cell, B, H, proj or H, bool(proj), torch.float64) == expected_plan
    lens = [(T - 7 * b) % (T + 1) for b in range(B)] if lengths else None  # T first; 0 once B > T
    args = make_layer_args(cell, T, B, 5, H, proj=proj, lengths=lens, reverse=reverse)
    check_cpu_against_reference(cell, args)


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_small_steps_stay_on_one_thread(threads):
    assert plan("lstm", 1, 32, 32, False, torch.float32) == [1, 0]
    assert plan("lstm", 1, 256, 256, False, torch.float32) == [2, 1]


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_team_fp32(threads):
    T, B, H = 9, 3, 129  # 5 fp32 blocks, the last one unit wide
    assert plan("lstm", B, H, H, False, torch.float32) == [2, 1]
    args = make_layer_args("lstm", T, B, 7, H, dtype=torch.float32)
    check_cpu_against_reference("lstm", args)


@pytest.mark.parametrize("cell,proj", [(c, 0) for c in CELLS] + [("lstm", 5)])  # projection is LSTM-only
@pytest.mark.parametrize("reverse", [False, True])
def test_single_step_matches_reference(cell, proj, reverse):
    """T=1 (the cells) takes at::mm instead of packed weights; a zero length keeps h0/c0 and their gradients."""
    args = make_layer_args(cell, 1, 4, 6, 9, proj=proj, lengths=[1, 0, 1, 1], reverse=reverse)
    check_cpu_against_reference(cell, args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cell,proj", [(c, 0) for c in CELLS] + [("lstm", 4)])
@pytest.mark.parametrize("lengths,reverse", [(None, False), ([6, 2, 0], True)])
def test_half_precision_is_computed_in_fp32(cell, proj, dtype, lengths, reverse):
    """fp16/bf16 on the cpu backend: widened to fp32 around the kernel. Error bound: the tolerance rule of
    tests/helpers.py (2x the spec's own error when it computes natively in that dtype, plus a few ulp)."""
    args64 = make_layer_args(cell, 6, 3, 5, 9, proj=proj, lengths=lengths, reverse=reverse)
    compare_with_reference(cell, args64, dtype, on_cpu(cell))


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("cell,proj", [(c, 0) for c in CELLS] + [("lstm", 20)])
def test_inputs_are_not_modified(cell, proj, threads):
    a = make_layer_args(cell, 9, 4, 3, 40, proj=proj, dtype=torch.float32, lengths=[9, 2, 0, 5])
    check_inputs_not_modified(cell, a, fusedrnn.use_backend("cpu"))


@pytest.mark.parametrize("threads", [2, 3], indirect=True)
@pytest.mark.parametrize("cell,split", CASES)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_team_split_on_packed_data(cell, split, threads, reverse):
    """The same splits on a PackedSequence's data (StepRows): each thread's rows shrink with batch_sizes, a
    row split's thread may have none left, and the input projection's chunks start at packed rows."""
    T, B, H, proj = SPLITS[split]
    assert plan(cell, B, H, proj or H, bool(proj), torch.float64) == [threads, 0 if split.startswith("rows") else 1]
    lengths = torch.tensor(sorted(((T - 7 * b) % T + 1 for b in range(B)), reverse=True))
    args, batch_sizes, lengths = packed_layer_args(cell, T, B, 5, H, lengths, proj=proj)
    want_out, want_grads = outputs_and_grads(lambda **a: packed_spec(cell, batch_sizes, lengths, reverse, **a), args)
    out, grads = outputs_and_grads(lambda **a: packed_fast(cell, batch_sizes, reverse, **a), args)
    for name, o, w in zip(("y", "h_n", "c_n"), out, want_out):
        assert_close_to_reference(name, o, w)
    for name, g in grads.items():
        assert_close_to_reference(f"grad {name}", g, want_grads[name])
