"""How time and memory are measured.

Time: `warmup` untimed calls, then up to `repeats` timed calls, each timed on its own -- CUDA events around
the call on a GPU (then a synchronize, so every call starts on an idle device), time.perf_counter on a CPU --
stopping early once `max_seconds` were measured and at least 3 calls were timed. The providers of a case
take turns call by call (see `measure`). Summary: median, p20, p80, min over the timed calls.

Peak memory of one call, after the timed calls (so one-time allocations such as caches are not counted):
  GPU  torch.cuda.max_memory_allocated() during the call minus what was allocated before it: the memory
       the call itself takes through PyTorch's allocator (activations, workspace, gradients).
  CPU  (Linux) growth of the process's peak resident set during the call: VmHWM is reset through
       /proc/self/clear_refs and freed heap is returned first (malloc_trim), so memory the call takes from
       anywhere (oneDNN scratch, C++ kernels' own buffers) counts. It misses memory reused from pages the
       allocator still holds, so read it as a lower bound. "n/a" where /proc does not allow this.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import re
import statistics
import time
from typing import Callable, Optional

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(steps: dict, device: torch.device, warmup: int, repeats: int,
            max_seconds: float = math.inf) -> dict:
    """Milliseconds of each timed call of each step, {name: (run, context factory)} -> {name: [ms, ...]}.

    The steps take turns (one call of each per round), so a change of load on a shared machine during the
    measurement falls on every provider alike instead of on whichever ran then. A step leaves the rounds
    once it has `repeats` calls, or `max_seconds` measured and 3 calls at least."""
    for run, context in steps.values():
        with context():
            for _ in range(warmup):
                run()
            synchronize(device)
    times: dict = {name: [] for name in steps}
    active = list(steps)
    use_events = device.type == "cuda"
    if use_events:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    while active:
        for name in list(active):
            run, context = steps[name]
            with context():
                if use_events:
                    start.record()
                    run()
                    end.record()
                    end.synchronize()
                    ms = start.elapsed_time(end)
                else:
                    t0 = time.perf_counter()
                    run()
                    ms = (time.perf_counter() - t0) * 1e3
            t = times[name]
            t.append(ms)
            if len(t) >= repeats or (len(t) >= 3 and sum(t) / 1e3 >= max_seconds):
                active.remove(name)
    return times


def median_ms(calls: dict, mode: str, repeats: int, max_seconds: float,
              device: torch.device = torch.device("cpu")) -> dict:
    """{name: median ms} of `calls` ({name: fn returning a tensor}), taking turns as `measure` does: mode "fwd"
    times fn() under no_grad, "fwdbwd" fn().sum().backward(); one warm-up call each."""
    def step(fn):
        if mode == "fwd":
            return fn, torch.no_grad
        return (lambda: fn().sum().backward()), contextlib.nullcontext
    times = measure({name: step(fn) for name, fn in calls.items()}, device, 1, repeats, max_seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), q in [0, 1]."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> dict:
    return {"median_ms": statistics.median(times_ms), "p20_ms": quantile(times_ms, 0.2),
            "p80_ms": quantile(times_ms, 0.8), "min_ms": min(times_ms), "n_timed": len(times_ms)}


# ---------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------
_KB = re.compile(r"^(VmRSS|VmHWM):\s+(\d+)\s+kB", re.M)


def _proc_status_kb() -> Optional[dict]:
    try:
        with open("/proc/self/status") as f:
            return {k: int(v) for k, v in _KB.findall(f.read())}
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda max_memory_allocated delta"
    if _proc_status_kb() is not None and _reset_peak_rss():
        return "peak RSS delta (lower bound)"
    return "n/a"


def peak_memory_mb(run: Callable[[], object], device: torch.device) -> Optional[float]:
    """MiB one call of run() takes at its peak (see the module doc), or None where it cannot be measured."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    if device.type != "cpu":
        return None
    _malloc_trim()
    if not _reset_peak_rss():
        return None
    before = _proc_status_kb()
    if before is None:
        return None
    run()
    after = _proc_status_kb()
    return max(0, after["VmHWM"] - before["VmRSS"]) / 1024
