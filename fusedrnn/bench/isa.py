"""Benchmarks at one CPU instruction-set level, fusedrnn's and torch's alike.

fusedrnn's cpu kernels take FUSEDRNN_CPU_ISA=avx512|avx2|baseline (csrc/cpu/isa.h); torch caps its own with
ATEN_CPU_CAPABILITY (ATen kernels), ONEDNN_MAX_CPU_ISA (oneDNN: torch.nn.LSTM/GRU/RNN on the CPU) and
MKL_ENABLE_INSTRUCTIONS (MKL GEMMs). All are read when the libraries load, so a level means a fresh process:
`run_at_level` re-runs the current command in one. Comparing fusedrnn's AVX2 path with an uncapped torch on an
AVX-512 machine would flatter torch; capped to the same level, both use the same registers.

Nothing here imports torch: the environment must be set before torch loads.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Iterator, Optional

LEVELS = ("avx512", "avx2", "baseline")

# torch's names for each level: ATen's CPU capability, oneDNN's max ISA, MKL's instruction set -- and MKL's
# conditional-numerical-reproducibility branch, because on AMD CPUs MKL ignores MKL_ENABLE_INSTRUCTIONS (its
# sgemm stayed the AVX2+FMA zen kernel at "SSE4_2": 71 GFLOP/s at 512^3 on one Zen 3 core) while MKL_CBWR
# caps it (COMPATIBLE, MKL's SSE2 path: 15.9 GFLOP/s; AVX2: 56, unchanged). torch.nn.GRU / RNN run on MKL.
TORCH_CAPS = {
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512", "MKL_CBWR": "AVX512"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "MKL_CBWR": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                 "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "MKL_CBWR": "COMPATIBLE"},
}
CHILD_ENV = "FUSEDRNN_BENCH_ISA_CHILD"


def level_environ(level: str) -> dict:
    """The environment of a process where fusedrnn and torch both run at `level`."""
    if level not in TORCH_CAPS:
        raise ValueError(f"--isa: expected one of {', '.join(LEVELS)} or 'all', got {level!r}")
    return dict(os.environ, FUSEDRNN_CPU_ISA=level, **TORCH_CAPS[level], **{CHILD_ENV: level})


def machine_levels() -> list[str]:
    """The levels this CPU runs, best first (asks the extension in a throw-away process: importing torch here
    would fix this process's torch ISA)."""
    code = "import torch, fusedrnn; print(','.join(torch.ops.fusedrnn.cpu_isa_levels()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().split(",")


def requested_levels(value: Optional[str]) -> list[str]:
    """--isa's value as a list of levels ('all': every level this CPU runs)."""
    if value is None:
        return []
    if value == "all":
        return machine_levels()
    levels = [v.strip() for v in value.split(",") if v.strip()]
    for level in levels:
        level_environ(level)  # validates
    return levels


def in_level_child() -> Optional[str]:
    """The level this process was started at by run_at_level, else None."""
    return os.environ.get(CHILD_ENV)


def run_at_level(level: str, argv: list[str]) -> int:
    """Runs `python argv...` with fusedrnn and torch capped to `level`; returns its exit status."""
    print(f"== ISA level {level}: FUSEDRNN_CPU_ISA={level} " +
          " ".join(f"{k}={v}" for k, v in TORCH_CAPS[level].items()), flush=True)
    return subprocess.run([sys.executable] + argv, env=level_environ(level)).returncode


@contextlib.contextmanager
def busy_cores(n: int) -> Iterator[None]:
    """n processes spinning on a core each for the duration: the load of another job on a shared machine."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()
