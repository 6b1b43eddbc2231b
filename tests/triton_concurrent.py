"""pytest fixtures for Triton kernels whose programs wait on each other (grid barriers), run on CPU tensors
in Triton's interpreter with every program in its own thread (fusedrnn/triton/concurrent_interpreter.py).

    from triton_concurrent import concurrent_interpreter  # noqa: F401  (a fixture)

    def test_my_barrier_kernel(concurrent_interpreter):
        my_kernel[(4,)](...)                      # programs run concurrently; a deadlock raises LaunchAborted
        assert concurrent_interpreter.launches == 1

Inside the fixture the fusedrnn triton backend also offers its barrier path (use_path("barrier")).
"""
from __future__ import annotations

import pytest

from fusedrnn.triton.concurrent_interpreter import concurrent_programs

# A launch of the barrier tests loads or stores every few ms (a step of the LSTM, 6 programs: ~30 ms under
# load); 10 s without any is a deadlock, and the job fails 10 s later instead of at the CI timeout.
STALL_TIMEOUT = 10.0


@pytest.fixture
def concurrent_interpreter():
    """Every interpreted Triton launch of the test runs its programs concurrently, taking turns round robin
    at each atomic (a deterministic schedule). Yields the Stats."""
    with concurrent_programs(stall_timeout=STALL_TIMEOUT) as stats:
        yield stats


@pytest.fixture(params=[1, 2], ids=lambda s: f"fuzz-seed{s}")
def fuzzed_interpreter(request):
    """The turn goes to a random program at each atomic and at 20% of the loads and stores (seeded: the
    same seed gives the same schedule), so a program may run several steps ahead or stop between its
    stores and its arrival."""
    with concurrent_programs(stall_timeout=STALL_TIMEOUT, fuzz=0.2, seed=request.param) as stats:
        yield stats
