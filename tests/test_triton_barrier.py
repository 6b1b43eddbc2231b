"""The Triton barrier path run for real on the CPU: rnn_persistent.py's BARRIER variant (hidden units split
across programs that meet at a grid barrier every step) through the triton backend, with several slices and
batch tiles, in Triton's interpreter with every program in its own thread
(fusedrnn/triton/concurrent_interpreter.py; fixtures in tests/triton_concurrent.py).

- guard: the interpreter internals the concurrent interpreter patches are the ones it was written for
  (runs wherever triton imports, GPU machines included);
- the harness itself on a toy barrier kernel: program ids, error propagation, the deadlock watchdog;
- the barrier path of every cell at fp16 and bf16 (fp32 is refused: the path takes fp16/bf16 only),
  forward and every gradient, both directions, lengths including 0, against the fp64 reference with the
  rule of tests/helpers.py; the same under fuzzed schedules;
- planted bugs (a barrier that does not wait, one arrival short, one too many, a single exchange slot, a
  backward whose barrier does not wait) are caught, by values or by the watchdog.
bf16 runs with DOT_FP32 (the launcher sets it in the interpreter, whose bf16 tl.dot is wrong), as in
tests/test_triton.py. On a GPU the barrier path runs natively in test_triton.py::test_gpu_real_sizes.
"""
from __future__ import annotations

import time

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import fusedrnn  # noqa: E402
from fusedrnn import functional  # noqa: E402
from fusedrnn.backends import BACKENDS, LayerCall  # noqa: E402
from fusedrnn.backends.triton import plan, use_path  # noqa: E402
from fusedrnn.triton import concurrent_interpreter as ci  # noqa: E402
from fusedrnn.triton.cell_math import grid_barrier  # noqa: E402
from helpers import CELLS, compare_with_reference, interpreting_triton, make_layer_args, run_and_grad  # noqa: E402
from triton_concurrent import concurrent_interpreter, fuzzed_interpreter  # noqa: E402,F401  (fixtures)

interpreter_only = pytest.mark.skipif(
    not interpreting_triton(), reason="interpreter only: on a GPU the barrier path runs natively in "
                                      "test_triton.py::test_gpu_real_sizes")


# ---------------------------------------------------------------------------------------------------------
# Guard: a Triton upgrade that changes the patched internals fails here, with the names
# ---------------------------------------------------------------------------------------------------------
def test_interpreter_internals_are_the_patched_ones():
    problems = ci.check_interpreter()
    assert not problems, (f"triton {triton.__version__}: the interpreter internals that "
                          "fusedrnn/triton/concurrent_interpreter.py patches changed:\n  " + "\n  ".join(problems))


def test_guard_names_what_changed(monkeypatch):
    from triton.runtime import interpreter as I

    def new_call(self, *args, **kwargs):  # a GridExecutor.__call__ with another body
        return None
    monkeypatch.setattr(I.InterpreterBuilder, "create_atomic_rmw", lambda self, op, ptr, val, sem, scope: None)
    monkeypatch.delattr(I, "_implicit_cvt")
    monkeypatch.setattr(I.GridExecutor, "__call__", new_call)
    problems = "\n".join(ci.check_interpreter())
    assert "InterpreterBuilder.create_atomic_rmw('self', 'rmwOp', 'ptr', 'val', 'sem', 'scope')" not in problems
    assert "create_atomic_rmw('self', 'op', 'ptr', 'val', 'sem', 'scope'): expected parameters" in problems
    assert "_implicit_cvt is gone" in problems
    assert "GridExecutor.__call__ changed" in problems
    with pytest.raises(ci.InterpreterMismatch, match="create_atomic_rmw"):
        with ci.concurrent_programs():
            pass
    assert not ci.active()


# ---------------------------------------------------------------------------------------------------------
# The harness on a toy kernel: each step every program adds (its id + 1 + the last total) into that step's
# slot, meets the others at cell_math.grid_barrier (the kernels' own) and reads the new total back
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _toy_kernel(buf_ptr, out_ptr, sync_ptr, STEPS, EXTRA_ARRIVALS: tl.constexpr, FAIL_PROGRAM: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.num_programs(0)
    total = pid * 0
    for s in range(STEPS):
        if pid == FAIL_PROGRAM and s == 1:
            tl.arange(0, 3)  # raises: not a power of 2
        tl.atomic_add(buf_ptr + s, pid + 1 + total)
        grid_barrier(sync_ptr, (s + 1) * n + EXTRA_ARRIVALS)
        total = tl.load(buf_ptr + s)
    tl.store(out_ptr + pid, total)


def _toy(programs, steps, extra=0, fail=-1):
    """(what each program ended with, what it should have)."""
    out = torch.full((programs,), -1, dtype=torch.int32)
    _toy_kernel[(programs,)](torch.zeros(steps, dtype=torch.int32), out, torch.zeros(1, dtype=torch.int32), steps,
                             EXTRA_ARRIVALS=extra, FAIL_PROGRAM=fail)
    total = 0
    for _ in range(steps):
        total = sum(p + 1 + total for p in range(programs))
    return out.tolist(), [total] * programs


@interpreter_only
@pytest.mark.parametrize("programs", [2, 5])
def test_toy_barrier_runs_concurrently(programs, concurrent_interpreter):
    """Each program sees its own program id (thread-local) and waits for the others every step."""
    out, expected = _toy(programs, steps=4)
    assert out == expected
    assert (concurrent_interpreter.launches, concurrent_interpreter.programs) == (1, programs)
    assert concurrent_interpreter.atomics >= programs * 4 * 3  # arrival, first poll, add


@interpreter_only
def test_watchdog_aborts_a_deadlock():
    """One arrival more than the grid makes: every program spins; the launch is aborted after the stall
    timeout with the kernel, the grid and where each program waits, and the next launch runs normally."""
    with ci.concurrent_programs(stall_timeout=1.0) as stats:
        start = time.monotonic()
        with pytest.raises(ci.LaunchAborted, match=r"_toy_kernel grid \(3, 1, 1\) aborted: no program loaded or "
                                                   r"stored anything for 1 s \(deadlock\?\); 3 of 3 programs left"
                                                   r".*cell_math.py:\d+ \(grid_barrier\)"):
            _toy(3, steps=2, extra=1)
        assert time.monotonic() - start < 8.0  # 1 s stall + 0.05 s polls; generous for a loaded machine
        out, expected = _toy(3, steps=2)
        assert out == expected and stats.launches == 2


@interpreter_only
def test_program_error_is_raised_with_its_index():
    """Program 1 fails at step 1 while the others wait for it at the barrier: the launch raises at once
    (not after the stall timeout) with program 1's error."""
    with ci.concurrent_programs(stall_timeout=30.0):
        start = time.monotonic()
        with pytest.raises(triton.runtime.errors.InterpreterError, match=r"program \(1, 0, 0\) of _toy_kernel.*"
                                                                         r"power of 2"):
            _toy(3, steps=3, fail=1)
        assert time.monotonic() - start < 15.0
