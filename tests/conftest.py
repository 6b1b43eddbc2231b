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
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
