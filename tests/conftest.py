import os
import sys

import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. Set before anything imports
# triton, so every test session on a CPU machine (CI included) tests them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    # The CUDA emulator's largest cases (slow AND cuda-emu, minutes each on 2 cores) run only when asked for:
    # -m 'slow' (or any marker expression naming it) or FUSEDRNN_RUN_SLOW=1. Every path x cell x dtype of the
    # emulated backend still runs in the default suite (tests/test_cuda.py).
    asked = "slow" in (config.getoption("markexpr") or "") or os.environ.get("FUSEDRNN_RUN_SLOW") == "1"
    if not asked:
        skip_slow_emu = pytest.mark.skip(reason="slow on the CUDA emulator: -m slow or FUSEDRNN_RUN_SLOW=1 runs it")
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            if "slow" in item.keywords and "cuda-emu" in params.values():
                item.add_marker(skip_slow_emu)
    if os.environ.get("FUSEDRNN_QUICK") == "1":
        _keep_each_parameter_value_once(config, items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _keep_each_parameter_value_once(config, items):
    """FUSEDRNN_QUICK=1 (bench/gpu_suite.sh quick, a 10-minute GPU command): of each parametrized test keep the
    cases that bring a parameter value not seen yet -- every path, cell, dtype, ... at least once, not their
    product. Greedy, in collection order, so the choice is the same on every run."""
    seen, keep, drop = set(), [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", None)
        if not params:
            keep.append(item)
            continue
        name = getattr(item, "originalname", item.name)
        new = {(item.path, name, key, repr(value)) for key, value in params.items()} - seen
        if new:
            seen |= new
            keep.append(item)
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
