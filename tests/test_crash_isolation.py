"""Crash isolation (issue #20): the risky cases of tests/crash_cases.py (empty tensors and zero sizes, huge sizes
that must raise cleanly, misaligned / strided / overlapping / expanded memory, NaN and Inf, threads with mixed
dtypes) run in a child process per backend. A case that kills the child (segfault, SIGFPE, abort) fails here
under its own name, with the signal, and the child is restarted for the cases after it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import fusedrnn
import crash_cases

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKENDS = [b for b in ("reference", "cpu") if b in fusedrnn.available_backends("cpu")]
CPU_KERNEL_ONLY = {"empty_batch_cpu_kernel"}  # calls the C++ op directly: not a backend choice
_results: dict = {}


def _run_child(jobs: list[str]) -> dict:
    """{"backend:name": (status, detail)} for every job; status 'ok', 'fail' or 'crash'."""
    results = {}
    todo = list(jobs)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    while todo:
        proc = subprocess.run([sys.executable, os.path.join(HERE, "crash_cases.py"), *todo],
                              capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        started = None
        for line in proc.stdout.splitlines():
            word, _, rest = line.partition(" ")
            job, _, detail = rest.partition(": ")
            if word == "START":
                started = job
            elif word in ("OK", "FAIL"):
                results[job] = ("ok" if word == "OK" else "fail", detail)
                started = None
        if started is not None:  # the child died inside this case: record it, restart with the rest
            rc = proc.returncode
            why = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
            results[started] = ("crash", f"{why}; stderr: {proc.stderr[-1500:]}")
        todo = [j for j in todo if j not in results]
        if started is None and todo:  # the child ended without starting them
            for j in todo:
                results[j] = ("crash", f"never ran; exit code {proc.returncode}; stderr: {proc.stderr[-1500:]}")
            todo = []
    return results


def _jobs():
    return [f"{backend}:{name}" for backend in BACKENDS for name in crash_cases.CASES
            if backend == "cpu" or name not in CPU_KERNEL_ONLY]


def _result(backend: str, name: str):
    if not _results:  # one child for every case on every backend (an interpreter start costs ~10 s here)
        _results.update(_run_child(_jobs()))
    return _results[f"{backend}:{name}"]


def _params():
    out = []
    for backend in BACKENDS:
        for name in crash_cases.CASES:
            if name in CPU_KERNEL_ONLY and backend != "cpu":
                continue
            out.append(pytest.param(backend, name, id=f"{name}-{backend}"))
    return out


@pytest.mark.parametrize("backend,name", _params())
def test_risky_case(backend, name):
    status, detail = _result(backend, name)
    assert status == "ok", f"{name} on {backend}: {status}: {detail}"
