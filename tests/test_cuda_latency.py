"""The latency model of the CUDA paths (fusedrnn/backends/cuda_latency.py, issue #17 item 4): its arithmetic
is the planner's real layout plus stated constants; these tests pin what the issue asks of it and that the
backend's path choice follows it. (A model, not a measurement: bench/gpu_suite.sh's quick plan measures.)"""
import math

import pytest
import torch

from fusedrnn._extension import has_emulated_cuda

pytestmark = pytest.mark.skipif(not has_emulated_cuda(), reason="needs the planner of the emulated CUDA backend")

from fusedrnn.backends import cuda_latency  # noqa: E402


def test_lstm_fp16_h768_b16_forward_is_predicted_under_1_3_us():
    """The issue's case, for the design as built (slices staging: its 8 units x 2 bytes are one 16-byte piece)."""
    est = cuda_latency.estimates("lstm", 768, 16, torch.float16, "forward")
    e = est["persistent"]
    assert e.barrier == "slices"
    assert e.per_step_us <= 1.3, cuda_latency.explain("lstm", 768, 16, torch.float16, "forward")
    # and the terms add up to the total, each positive
    assert math.isclose(sum(e.parts.values()), e.per_step_us) and all(v > 0 for v in e.parts.values())


def _per_step(H, B, barrier, dtype=torch.float16):
    return cuda_latency.step_estimate("persistent", "lstm", H, B, dtype, "forward", barrier=barrier).per_step_us


def test_each_synchronisation_design_is_cheaper_than_the_one_before():
    for H, B in ((256, 1), (768, 16), (1024, 64)):
        est = [_per_step(H, B, b) for b in ("slices", "flags", "sc")]
        assert est == sorted(est)
    # the tag in the data saves round trips where latency rules, and loses to its wider words where L2 bandwidth
    # does (every CTA reads all of h: 128 CTAs x 64 rows x 1024 at H=1024 B=64)
    assert _per_step(768, 16, "tag") < _per_step(768, 16, "slices")
    assert _per_step(1024, 64, "tag") > _per_step(1024, 64, "slices")


def test_built_design_follows_the_kernels_slice_rule():
    """"built" is slices where a CTA's slice of a row is whole 16-byte pieces (the kernel's slices_stageable),
    else flags; every backward plan has units a multiple of 16, so it always stages slices."""
    seen = set()
    for cell in ("lstm", "gru"):
        for H in (256, 768, 1024):
            for dtype in (torch.float16, torch.float32):
                for direction in ("forward", "backward"):
                    e = cuda_latency.step_estimate("persistent", cell, H, 16, dtype, direction)
                    if e.refused:
                        continue
                    elem = 4 if dtype == torch.float32 else 2
                    want = "slices" if e.plan["units"] * elem % 16 == 0 else "flags"
                    assert e.barrier == want, (cell, H, dtype, direction, e.plan)
                    if direction == "backward":
                        assert want == "slices"
                    seen.add(want)
    assert seen == {"slices", "flags"}  # both designs are exercised by real plans
    with pytest.raises(ValueError, match="barrier must be one of"):
        cuda_latency.step_estimate("persistent", "lstm", 768, 16, torch.float16, "forward", barrier="release-acquire")


def test_refusals_come_from_the_planner():
    e = cuda_latency.step_estimate("cluster", "lstm", 768, 16, torch.float16, "forward")
    assert e.refused and "cluster" in e.refused and math.isinf(e.per_step_us)
    assert cuda_latency.paths_by_model("lstm", 768, 16, 1024, torch.float16, "forward")[-1] == "cluster"


def test_large_batch_goes_to_alternating_and_small_to_persistent():
    assert cuda_latency.paths_by_model("lstm", 768, 256, 1024, torch.float16, "forward")[0] == "alternating"
    assert cuda_latency.paths_by_model("lstm", 768, 16, 1024, torch.float16, "forward")[0] == "persistent"
    assert cuda_latency.paths_by_model("gru", 2048, 16, 1024, torch.float16, "backward")[0] == "alternating"


def test_table_covers_the_issue_grid():
    text = cuda_latency.table(cells=("lstm",), hiddens=(256, 512, 768, 1024, 2048), batches=(1, 16, 64, 256))
    for H in (256, 512, 768, 1024, 2048):
        assert f"| {H} |" in text
    assert text.count("**") >= 2 * 20 * 2  # one best per cell of both tables
