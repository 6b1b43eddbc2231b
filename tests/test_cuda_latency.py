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
    est = cuda_latency.estimates("lstm", 768, 16, torch.float16, "forward")
    best = min(e.per_step_us for e in est.values())
    assert best <= 1.3, cuda_latency.explain("lstm", 768, 16, torch.float16, "forward")
    # and the terms add up to the total, each positive
    e = est["persistent"]
    assert math.isclose(sum(e.parts.values()), e.per_step_us) and all(v > 0 for v in e.parts.values())


def test_each_synchronisation_design_is_cheaper_than_the_one_before():
    for H, B in ((256, 1), (768, 16), (1024, 64)):
        est = [cuda_latency.step_estimate("persistent", "lstm", H, B, torch.float16, "forward", barrier=b).per_step_us
               for b in ("release-acquire", "flags", "sc")]
        assert est == sorted(est)


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
