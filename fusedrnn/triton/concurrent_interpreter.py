"""Run every program of a Triton-interpreter launch in its own thread, so kernels whose programs wait on each
other (the grid barrier of rnn_persistent.py's barrier variant) finish under TRITON_INTERPRET=1.

Triton's interpreter runs a launch's programs one after another: program 0 spinning on a grid barrier waits
for arrivals of programs that never start. Inside `concurrent_programs()`:
  - each program (x, y, z) runs in a thread of its own; its program id is thread-local;
  - the programs take turns: one runs, the others wait on an event; after every atomic the running program
    hands the turn on (round robin; a spinning program polls once per turn, so it never starves the one it
    waits for). One program at a time makes a schedule deterministic: the same run, the same interleaving
    (free-running threads under the GIL were not: they missed the tests' single-slot mutant in 2 of 7 runs);
  - `fuzz=p`: the turn goes to a random program (maybe the same) at every atomic, and with probability p at
    every load and store, from a generator seeded by `seed`: a program runs several steps ahead or stops
    between its stores and its arrival, reproducibly;
  - a watchdog aborts a launch in which no program loaded or stored anything for `stall_timeout` seconds
    (every live program spins on an atomic: a deadlock) or that runs past `timeout`; the error names the
    kernel, the grid and the lines each stuck program waits at, and the CI job fails instead of hanging;
  - an exception in any program stops the others and is raised (InterpreterError, as the stock interpreter
    raises it) with the program's index.
The fusedrnn triton backend offers its barrier path under the interpreter only while this is active
(`active()`); on a GPU nothing here is used. What it cannot show: memory-model bugs (a missing fence or
.cg): the interpreter's memory is sequentially consistent.

It replaces private names of triton/runtime/interpreter.py (GridExecutor.__call__ is re-implemented;
InterpreterBuilder's grid_idx, atomics, masked loads and stores are wrapped). `check_interpreter()` lists
what differs from the interpreter this was written against (run on triton 3.8; 3.6.0, 3.7.1 and 3.9.0
compared by source); entering `concurrent_programs()` raises `InterpreterMismatch` with that list, and
tests/test_triton_barrier.py pins it, so a Triton upgrade fails a test with the reason instead of hanging.

Usage (a contributor's barrier kernel on the CPU; tests/triton_concurrent.py has the pytest fixtures):
    with concurrent_programs(stall_timeout=5) as stats:
        my_kernel[(4,)](...)
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import inspect
import os
import random
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional


class LaunchAborted(RuntimeError):
    """A launch stopped by the watchdog (deadlock or timeout), or a program stopped because another raised."""


class InterpreterMismatch(RuntimeError):
    """The installed Triton's interpreter differs from the one this module patches."""


# ---------------------------------------------------------------------------------------------------------
# What is patched, and what it must look like
# ---------------------------------------------------------------------------------------------------------
# (owner, attribute, parameters[, other accepted parameters]) of every callable this module wraps or calls.
# The owner is a class of triton.runtime.interpreter or the module itself ("").
EXPECTED_SIGNATURES = [
    ("GridExecutor", "__init__", ["self", "fn", "arg_names", "grid", "pre_run_hooks"]),
    ("GridExecutor", "_init_args_hst", ["self", "args_dev", "kwargs"]),
    ("GridExecutor", "_restore_args_dev", ["self", "args_dev", "args_hst", "kwargs", "kwargs_hst"]),
    ("InterpreterBuilder", "set_grid_idx", ["self", "x", "y", "z"]),
    ("InterpreterBuilder", "set_grid_dim", ["self", "nx", "ny", "nz"]),
    ("InterpreterBuilder", "create_get_program_id", ["self", "axis"]),
    ("InterpreterBuilder", "create_atomic_rmw", ["self", "rmwOp", "ptr", "val", "mask", "sem", "scope"]),
    ("InterpreterBuilder", "create_atomic_cas", ["self", "ptr", "cmp", "val", "sem", "scope"]),
    ("InterpreterBuilder", "create_masked_load",  # 3.9 merged the two cache arguments (passed through)
     ["self", "ptrs", "mask", "other", "cache_modifier", "eviction_policy", "is_volatile"],
     ["self", "ptrs", "mask", "other", "cache_policy", "is_volatile"]),
    ("InterpreterBuilder", "create_masked_store", ["self", "ptrs", "value", "mask", "cache_modifier",
                                                   "eviction_policy"],
     ["self", "ptrs", "value", "mask", "cache_policy"]),
    ("", "_patch_lang", ["fn"]),
    ("", "_implicit_cvt", ["arg"]),
]
# Fingerprints (sha256 of the AST, comments and layout ignored) of the stock GridExecutor.__call__ that
# _concurrent_call re-implements, by Triton version; a new one means: re-read the stock __call__, port its
# changes to _concurrent_call, add the fingerprint.
KNOWN_GRID_CALLS = {
    "3.6-3.8": "475860e5f770ef14",  # 3.6.0, 3.7.1 and 3.8.0: the same source
    "3.9": "895aed5324a89171",  # keyword-only kernel arguments pass the kwargs filter (ported; not run here)
}
_PATCHED_METHODS = ("create_atomic_rmw", "create_atomic_cas", "create_masked_load", "create_masked_store")


def _interp():
    from triton.runtime import interpreter
    return interpreter


def grid_call_fingerprint(fn) -> str:
    src = textwrap.dedent(inspect.getsource(fn))
    return hashlib.sha256(ast.dump(ast.parse(src)).encode()).hexdigest()[:16]


def check_interpreter() -> List[str]:
    """What differs between the installed Triton's interpreter and the one this module patches ([] when
    nothing does)."""
    try:
        import triton
        I = _interp()
    except Exception as e:  # noqa: BLE001  (any import failure is the answer)
        return [f"triton.runtime.interpreter cannot be imported: {type(e).__name__}: {e}"]
    problems = []
    for owner, name, *accepted in EXPECTED_SIGNATURES:
        where = f"{owner}.{name}" if owner else name
        obj = getattr(I, owner, None) if owner else I
        fn = getattr(obj, name, None) if obj is not None else None
        if fn is None:
            problems.append(f"triton.runtime.interpreter.{where} is gone")
            continue
        fn = inspect.unwrap(fn)  # our own wrappers, should a check run while patched
        got = list(inspect.signature(fn).parameters)
        if got not in accepted:
            problems.append(f"triton.runtime.interpreter.{where}{tuple(got)}: expected parameters "
                            + " or ".join(str(tuple(p)) for p in accepted))
    if not isinstance(getattr(I, "interpreter_builder", None), getattr(I, "InterpreterBuilder", ())):
        problems.append("triton.runtime.interpreter.interpreter_builder is not an InterpreterBuilder instance")
    call = getattr(getattr(I, "GridExecutor", None), "__call__", None)
    if call is not None:
        stock = getattr(call, "_stock", call)
        fp = grid_call_fingerprint(stock)
        if fp not in KNOWN_GRID_CALLS.values():
            problems.append(f"triton.runtime.interpreter.GridExecutor.__call__ changed (triton {triton.__version__}: "
                            f"fingerprint {fp}, known {KNOWN_GRID_CALLS}); port its changes to "
                            f"fusedrnn/triton/concurrent_interpreter.py:_concurrent_call and add the fingerprint")
    return problems


# ---------------------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Stats:
    """Counters of one concurrent_programs() block (exact: one program runs at a time)."""
    launches: int = 0
    programs: int = 0
    atomics: int = 0
    handovers: int = 0  # the running program passed the turn to another
    longest_launch_s: float = 0.0


@dataclass
class _Settings:
    stall_timeout: float
    timeout: float
    fuzz: float
    seed: int
    max_programs: int
    stats: Stats = field(default_factory=Stats)


class _Launch:
    """The programs of one launch take turns: exactly one runs, each other waits on its own event (one
    Condition for all woke every waiter at each hand-over: 4 ms a hand-over on the 2 busy cores)."""

    def __init__(self, n: int, rng: Optional[random.Random]):
        self.lock = threading.Lock()
        self.wake = [threading.Event() for _ in range(n)]
        self.live = list(range(n))  # program numbers not finished, in launch order
        self.turn = 0
        self.rng = rng  # None: round robin
        self.abort: Optional[str] = None  # set: every program raises LaunchAborted at its next turn
        self.progress = 0  # loads + stores: the watchdog's heartbeat

    def next_after(self, me: int) -> int:
        if self.rng is not None:
            return self.rng.choice(self.live)
        later = [p for p in self.live if p > me]
        return later[0] if later else self.live[0]

    def give_turn(self, nxt: int):
        self.turn = nxt
        self.wake[nxt].set()

    def wait_turn(self, me: int):
        while self.turn != me and self.abort is None:
            self.wake[me].wait()
            self.wake[me].clear()
        if self.abort is not None:
            raise LaunchAborted(self.abort)

    def stop(self, why: str):
        self.abort = why
        for e in self.wake:
            e.set()


_settings: Optional[_Settings] = None
_saved: Optional[dict] = None
_tls = threading.local()  # grid_idx, number and launch of the program running on this thread
_launch_lock = threading.Lock()


def active() -> bool:
    """True inside concurrent_programs(): interpreted launches run their programs concurrently."""
    return _settings is not None


def _check_abort(launch: _Launch):
    if launch.abort is not None:
        raise LaunchAborted(launch.abort)


def _hand_over():
    """Called by the running program: pass the turn on (round robin, or a seeded random program, maybe this
    one) and wait until it comes back."""
    launch, me = _tls.launch, _tls.number
    with launch.lock:
        nxt = launch.next_after(me)
    if nxt != me:
        _settings.stats.handovers += 1
        launch.give_turn(nxt)
        launch.wait_turn(me)


def _wrap_atomic(stock):
    def atomic(self, *args, **kwargs):
        if getattr(_tls, "launch", None) is None:  # not in a program of a launch: nothing to schedule
            return stock(self, *args, **kwargs)
        _check_abort(_tls.launch)
        out = stock(self, *args, **kwargs)
        _settings.stats.atomics += 1
        _hand_over()  # a spinning program lets the others run at once
        return out
    atomic.__wrapped__ = stock
    return atomic


def _wrap_memory(stock):
    def memory(self, *args, **kwargs):
        launch = getattr(_tls, "launch", None)
        if launch is None:
            return stock(self, *args, **kwargs)
        _check_abort(launch)
        launch.progress += 1
        out = stock(self, *args, **kwargs)
        if launch.rng is not None and launch.rng.random() < _settings.fuzz:
            _hand_over()
        return out
    memory.__wrapped__ = stock
    return memory


def _grid_idx_get(self):
    return getattr(_tls, "grid_idx", None)


def _grid_idx_set(self, value):
    _tls.grid_idx = value


# ---------------------------------------------------------------------------------------------------------
# The launch
# ---------------------------------------------------------------------------------------------------------
def _where(thread, depth: int = 3) -> str:
    """file:line (function) of the innermost `depth` frames of `thread` outside Triton and this module."""
    frame = sys._current_frames().get(thread.ident)
    skip = (os.sep + "triton" + os.sep + "runtime" + os.sep, os.sep + "triton" + os.sep + "language" + os.sep,
            __file__, threading.__file__)
    found = []
    while frame is not None and len(found) < depth:
        name = frame.f_code.co_filename
        if not any(s in name for s in skip):
            found.append(f"{os.path.basename(name)}:{frame.f_lineno} ({frame.f_code.co_name})")
        frame = frame.f_back
    return " <- ".join(found) or "?"


def _watch(launch: _Launch, threads, name, grid, start):
    """Waits for the programs; stops the launch and raises LaunchAborted on a stall or at the timeout."""
    s, n = _settings, len(threads)
    last, last_t = -1, start
    while True:
        live = [t for t in threads if t.is_alive()]
        if not live:
            break
        live[0].join(0.05)
        now = time.monotonic()
        if launch.progress != last:
            last, last_t = launch.progress, now
        why = None
        if now - last_t > s.stall_timeout:
            why = f"no program loaded or stored anything for {s.stall_timeout:g} s (deadlock?)"
        elif now - start > s.timeout:
            why = f"still running after {s.timeout:g} s"
        if why and launch.abort is None:
            stuck = ", ".join(f"{t.name[len(name):]} at {_where(t)}" for t in live)
            launch.stop(f"launch of {name} grid {grid} aborted: {why}; {len(live)} of {n} programs left: {stuck}")
            for t in live:
                t.join(5.0)
            left = [t for t in live if t.is_alive()]
            raise LaunchAborted(launch.abort + (f"; {len(left)} threads did not stop (left as daemon threads)"
                                                if left else ""))


def _run_programs(fn, args, grid, name):
    s = _settings
    n = grid[0] * grid[1] * grid[2]
    if n > s.max_programs:
        raise LaunchAborted(f"{name}: grid {grid} has {n} programs, over max_programs={s.max_programs} threads")
    idx = [(x, y, z) for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])]
    launch = _Launch(n, random.Random(f"{s.seed}-{s.stats.launches}") if s.fuzz else None)
    errors = []

    def program(number):
        _tls.grid_idx, _tls.number, _tls.launch = idx[number], number, launch
        try:
            launch.wait_turn(number)
            fn(**args)
        except BaseException as e:  # noqa: BLE001  (reported by the launching thread)
            errors.append((idx[number], e))
            if launch.abort is None and not isinstance(e, LaunchAborted):
                launch.stop(f"program {idx[number]} of {name} raised {type(e).__name__}")
        finally:
            _tls.grid_idx = _tls.launch = None
            with launch.lock:
                nxt = launch.next_after(number)
                launch.live.remove(number)
                if nxt == number and launch.live:
                    nxt = launch.next_after(number)
            if launch.live:
                launch.give_turn(nxt)

    threads = [threading.Thread(target=program, args=(i,), name=f"{name}{idx[i]}", daemon=True) for i in range(n)]
    s.stats.launches += 1
    s.stats.programs += n
    start = time.monotonic()
    for t in threads:
        t.start()
    try:
        _watch(launch, threads, name, grid, start)
    except BaseException as e:  # KeyboardInterrupt too: no program may go on writing into freed tensors
        if launch.abort is None:
            launch.stop(f"launch of {name} grid {grid} interrupted: {type(e).__name__}")
        for t in threads:
            t.join(5.0)
        raise
    s.stats.longest_launch_s = max(s.stats.longest_launch_s, time.monotonic() - start)
    if errors:
        first = [e for e in errors if not isinstance(e[1], LaunchAborted)] or errors
        where, e = first[0]
        import triton
        if getattr(getattr(getattr(triton, "knobs", None), "compilation", None), "front_end_debugging", False):
            raise e
        raise _interp().InterpreterError(f"program {where} of {name}: {e!r}") from e


def _concurrent_call(self, *args_dev, **kwargs):
    """GridExecutor.__call__ (triton 3.6-3.9) with the serial loop over programs replaced by _run_programs."""
    I = _interp()
    if getattr(_tls, "grid_idx", None) is not None:
        raise RuntimeError("a Triton launch from inside a running program is not supported")
    with _launch_lock:
        argspec = inspect.getfullargspec(self.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in argspec.args or k in argspec.kwonlyargs}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        for hook in self.pre_run_hooks:
            hook(*args_hst, **kwargs_hst)
        patch_scope = I._patch_lang(self.fn)
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {name: arg if name in self.constexprs else I._implicit_cvt(arg) for name, arg in args.items()}
            grid = self.grid(args) if callable(self.grid) else self.grid
            assert len(grid) <= 3, "grid must have at most 3 dimensions"
            grid = tuple(grid) + (1, ) * (3 - len(grid))
            I.interpreter_builder.set_grid_dim(*grid)
            _run_programs(self.fn, args, grid, self.fn.__name__)
        finally:
            patch_scope.restore()
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)


def _wrap_grid_call(stock):
    def grid_call(self, *args, **kwargs):
        return _concurrent_call(self, *args, **kwargs)
    grid_call._stock = stock  # check_interpreter() fingerprints the stock one even while patched
    return grid_call


@contextlib.contextmanager
def concurrent_programs(stall_timeout: float = 10.0, timeout: float = 600.0, fuzz: float = 0.0, seed: int = 0,
                        max_programs: int = 512) -> Iterator[Stats]:
    """Inside the block every interpreted Triton launch runs its programs concurrently (see module doc).
    stall_timeout: seconds without any load or store before a launch is aborted as deadlocked; timeout: the
    longest a launch may run; fuzz: 0 hands the turn round robin at every atomic; above 0 to a random
    program (this one included) at every atomic and, with probability `fuzz`, at every load and store,
    from a generator seeded by `seed` and the launch's number: the same seed, the same schedule.
    Yields the block's Stats. Not reentrant; launches from several threads run one at a time."""
    global _settings, _saved
    if _settings is not None:
        raise RuntimeError("concurrent_programs() is already active")
    problems = check_interpreter()
    if problems:
        raise InterpreterMismatch("the concurrent interpreter does not support this Triton:\n  "
                                  + "\n  ".join(problems))
    I = _interp()
    B, G = I.InterpreterBuilder, I.GridExecutor
    _saved = {"grid_call": G.__dict__["__call__"], "grid_idx_class": B.__dict__.get("grid_idx"),
              "grid_idx_instance": I.interpreter_builder.__dict__.pop("grid_idx", None),
              "methods": {m: B.__dict__[m] for m in _PATCHED_METHODS}}
    _settings = _Settings(stall_timeout, timeout, fuzz, seed, max_programs)
    try:
        B.grid_idx = property(_grid_idx_get, _grid_idx_set)
        for m in ("create_atomic_rmw", "create_atomic_cas"):
            setattr(B, m, _wrap_atomic(_saved["methods"][m]))
        for m in ("create_masked_load", "create_masked_store"):
            setattr(B, m, _wrap_memory(_saved["methods"][m]))
        G.__call__ = _wrap_grid_call(_saved["grid_call"])
        yield _settings.stats
    finally:
        G.__call__ = _saved["grid_call"]
        for m, stock in _saved["methods"].items():
            setattr(B, m, stock)
        del B.grid_idx
        if _saved["grid_idx_class"] is not None:
            B.grid_idx = _saved["grid_idx_class"]
        if _saved["grid_idx_instance"] is not None:
            I.interpreter_builder.grid_idx = _saved["grid_idx_instance"]
        _settings = _saved = None
