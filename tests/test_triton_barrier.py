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


# ---------------------------------------------------------------------------------------------------------
# The barrier path through the backend
# ---------------------------------------------------------------------------------------------------------
# Three slices per batch tile, the last partial (LSTM/GRU: 64 + 64 + 22 units of H=150; RNN: 128 + 128 + 44
# of H=300; the slice widths are the GPU's, barrier_slice's), and two batch tiles of 8, the second partial:
# 6 programs per launch. T=4 reuses each ping-pong slot.
HIDDEN = {"lstm": 150, "gru": 150, "rnn_tanh": 300, "rnn_relu": 300}
SLICE = {"lstm": 64, "gru": 64, "rnn_tanh": 128, "rnn_relu": 128}
T, B, I = 4, 11, 3
LENGTHS = [4, 3, 0, 2, 4, 1, 4, 2, 3, 0, 1]  # a 0 in each batch tile; the second tile's longest is 3
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CASES = {"fwd": (False, None), "fwd-lengths": (False, LENGTHS), "rev": (True, None), "rev-lengths": (True, LENGTHS)}


@pytest.fixture
def slices(monkeypatch):
    """The slice_h of every persistent launcher call, so a test proves the barrier variant ran."""
    from fusedrnn.triton import rnn_persistent as P
    seen = []

    def spy(name):
        real = getattr(P, name)

        def wrapper(*args, slice_h=None, **kwargs):
            seen.append((name, slice_h))
            return real(*args, slice_h=slice_h, **kwargs)
        monkeypatch.setattr(P, name, wrapper)
    spy("persistent_forward")
    spy("persistent_backward")
    return seen


def run_barrier_path(cell, dtype, reverse, lengths, shape=None, between=None):
    """Forward and every gradient of the triton backend's barrier path vs the fp64 spec (helpers' rule) at
    shape (T, B, H), by default (T, B, HIDDEN[cell]). between(): called after the forward, before the
    backward."""
    t, b, h = shape or (T, B, HIDDEN[cell])
    args64 = make_layer_args(cell, t, b, I, h, reverse=reverse, lengths=lengths)

    def layer(**a):
        out = functional.rnn_layer(cell, **a)
        if between is not None:
            between()
        return out

    def run_fast(args):
        with fusedrnn.use_backend("triton"), use_path("barrier"):
            return run_and_grad(layer, args)
    compare_with_reference(cell, args64, dtype, run_fast)


# every case at fp16; bf16 (the same code, other rounding) at two, to keep the file within ~3 min on 2 cores
DTYPE_CASES = [("fp16", c) for c in CASES] + [("bf16", "fwd"), ("bf16", "rev-lengths")]


@interpreter_only
@pytest.mark.parametrize("dtype,case", DTYPE_CASES, ids=[f"{d}-{c}" for d, c in DTYPE_CASES])
@pytest.mark.parametrize("cell", CELLS)
def test_barrier_path_matches_reference(cell, dtype, case, concurrent_interpreter, slices):
    run_barrier_path(cell, DTYPES[dtype], *CASES[case])
    assert slices == [("persistent_forward", SLICE[cell]), ("persistent_backward", SLICE[cell])]
    assert (concurrent_interpreter.launches, concurrent_interpreter.programs) == (2, 12)


EDGE_SHAPES = {  # cell, T, B, H, dtype, lengths: 2 slices each
    "lstm-T1-B3-H128": ("lstm", 1, 3, 128, torch.float16, None),  # the forward has no barrier, the backward one
    "gru-T2-B8-H65": ("gru", 2, 8, 65, torch.bfloat16, [2, 0, 1, 2, 2, 1, 0, 2]),  # a slice of 1 unit, a full tile
    "rnn_relu-T3-B1-H129": ("rnn_relu", 3, 1, 129, torch.float16, None),  # 128 + 1 units, one sequence
}


@interpreter_only
@pytest.mark.parametrize("shape", list(EDGE_SHAPES))
def test_barrier_path_edge_shapes(shape, concurrent_interpreter, slices):
    cell, t, b, h, dtype, lengths = EDGE_SHAPES[shape]
    run_barrier_path(cell, dtype, True, lengths, shape=(t, b, h))
    assert [s for _, s in slices] == [SLICE[cell]] * 2 and concurrent_interpreter.programs == 2 * 2 * -(-b // 8)


@interpreter_only
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_barrier_path_fuzzed_schedules(cell, fuzzed_interpreter, slices):
    run_barrier_path(cell, torch.float16, True, LENGTHS)
    assert len(slices) == 2 and fuzzed_interpreter.handovers > fuzzed_interpreter.atomics  # loads, stores too


def _call(cell, H, dtype, B=11):
    a = make_layer_args(cell, 2, B, 3, H, dtype=dtype, requires_grad=False)
    return LayerCall(cell, a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"], None,
                     False)


@interpreter_only
def test_path_choice_under_the_concurrent_interpreter(concurrent_interpreter):
    """The GPU's rules, minus the residency check (every program is a thread): auto takes the barrier path
    where the weights do not fit one program; fp32 and the projection are refused with their reasons."""
    assert plan(_call("lstm", 150, torch.float16))[:2] == ("barrier", 64)
    assert plan(_call("rnn_tanh", 300, torch.bfloat16))[:2] == ("barrier", 128)
    assert plan(_call("lstm", 100, torch.float16))[:2] == ("persistent", None)
    with use_path("barrier"):
        assert "fp16/bf16 only" in BACKENDS["triton"].unsupported_reason(_call("lstm", 150, torch.float32))
        assert plan(_call("gru", 100, torch.float16))[:2] == ("barrier", 64)


@interpreter_only
def test_barrier_path_refused_by_the_serial_interpreter():
    with use_path("barrier"):
        why = BACKENDS["triton"].unsupported_reason(_call("lstm", 150, torch.float16))
    assert "one after another" in why and "concurrent_programs()" in why


# ---------------------------------------------------------------------------------------------------------
# Planted bugs: small copies of cell_math.grid_barrier / the forward's exchange, patched into rnn_persistent
# (the interpreter resolves the helpers a kernel calls in its module at run time)
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _barrier_without_wait(counter_ptr, target):
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _barrier_one_arrival_short(counter_ptr, target):
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while seen < target - 1:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def _barrier_one_arrival_too_many(counter_ptr, target):
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while seen < target + 1:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def _single_slot_state(h0_ptr, hbuf_ptr, s, B, rows, ks, m_k, HO: tl.constexpr, BLOCK_HO: tl.constexpr):
    # rnn_persistent._barrier_state reading slot 0 at every step
    if s == 0:
        h_in = tl.load(h0_ptr + rows[None, :] * HO + ks[:, None], mask=m_k, other=0.0)
    else:
        h_in = tl.load(hbuf_ptr + rows[None, :] * BLOCK_HO + ks[:, None], mask=m_k, other=0.0)
    return h_in


@triton.jit
def _single_slot_end_step(h_new, h, s, t, T, lens, y_ptr, hbuf_ptr, sync_ptr, B, rows, cols, m,
                          HO: tl.constexpr, BLOCK_HO: tl.constexpr, HAS_LENGTHS: tl.constexpr, BARRIER: tl.constexpr):
    # rnn_persistent._end_forward_step publishing into slot 0 at every step
    if HAS_LENGTHS:
        out = tl.where((t < lens)[None, :], h_new, 0.0)
        h = tl.where((t < lens)[None, :], h_new, h)
    else:
        out = h_new
        h = h_new
    tl.store(y_ptr + t.to(tl.int64) * B * HO + rows[None, :] * HO + cols[:, None], out.to(y_ptr.dtype.element_ty),
             mask=m)
    if BARRIER:
        tl.store(hbuf_ptr + rows[None, :] * BLOCK_HO + cols[:, None], h.to(y_ptr.dtype.element_ty), mask=m)
        if s + 1 < T:
            grid_barrier(sync_ptr + tl.program_id(0), (s + 1) * tl.num_programs(1))
    return h


VALUES_WRONG = r"max error (nan|\d\S*) > tolerance"


@interpreter_only
@pytest.mark.parametrize("mutant", [_barrier_without_wait, _barrier_one_arrival_short],
                         ids=["no-wait", "one-arrival-short"])
def test_mutant_barrier_is_caught_by_values(mutant, monkeypatch):
    """A program goes on before the others published: it reads a stale or unwritten exchange slot. Needs a
    fuzzed schedule (seeded, so the same every run): round robin runs the programs in lockstep, in which a
    barrier that does not wait still gives the right values."""
    from fusedrnn.triton import rnn_persistent as P
    monkeypatch.setattr(P, "grid_barrier", mutant)
    with ci.concurrent_programs(fuzz=0.2, seed=1), pytest.raises(AssertionError, match=r"^y: " + VALUES_WRONG):
        run_barrier_path("lstm", torch.float16, True, LENGTHS)


@interpreter_only
def test_mutant_backward_barrier_is_caught_by_gradients(monkeypatch):
    """The forward right, the backward's barrier not waiting: the outputs pass, a gradient does not."""
    from fusedrnn.triton import rnn_persistent as P
    with ci.concurrent_programs(fuzz=0.2, seed=1), pytest.raises(AssertionError, match=r"^grad \w+: " + VALUES_WRONG):
        run_barrier_path("gru", torch.float16, False, LENGTHS,
                         between=lambda: monkeypatch.setattr(P, "grid_barrier", _barrier_without_wait))


@interpreter_only
def test_mutant_single_exchange_slot_is_caught(monkeypatch, concurrent_interpreter):
    """One slot instead of two: a program publishes step s+1's state over step s's before a slower one read
    it. Round robin catches it: the first program past the barrier runs its whole step, up to its next
    arrival, before the next program reads (with free-running threads and 5 ms GIL slices every program
    read right after the barrier, long before any wrote, and this mutant passed)."""
    from fusedrnn.triton import rnn_persistent as P
    monkeypatch.setattr(P, "_barrier_state", _single_slot_state)
    monkeypatch.setattr(P, "_end_forward_step", _single_slot_end_step)
    with pytest.raises(AssertionError, match=r"^y: " + VALUES_WRONG):
        run_barrier_path("rnn_tanh", torch.float16, False, None)


@interpreter_only
def test_mutant_barrier_target_too_high_is_aborted(monkeypatch):
    """Waiting for one arrival more than the grid makes: a deadlock, aborted by the watchdog with where the
    programs wait, instead of a hung job."""
    from fusedrnn.triton import rnn_persistent as P
    monkeypatch.setattr(P, "grid_barrier", _barrier_one_arrival_too_many)
    start = time.monotonic()
    with ci.concurrent_programs(stall_timeout=1.0), pytest.raises(
            ci.LaunchAborted, match=r"lstm_persistent_fwd_kernel grid \(2, 3, 1\) aborted: .*\(deadlock\?\); "
                                    r"6 of 6 programs left: .*_barrier_one_arrival_too_many"):
        run_barrier_path("lstm", torch.float16, False, None)
    assert time.monotonic() - start < 20.0
