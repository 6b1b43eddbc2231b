"""The cpu backend's instruction-set levels (csrc/cpu/isa.h): avx512, avx2, baseline.

- Every level this CPU can run passes the cpu backend's correctness tests (tests/test_cpu_threads.py and the
  cpu beam top-k tests) in a subprocess with FUSEDRNN_CPU_ISA forcing it; the rest of the suite runs at the
  machine's best level. A level the CPU lacks is skipped, naming it (its code is still checked statically).
- FUSEDRNN_CPU_ISA: a bad value or a level the CPU lacks raises a clear error.
- Statically, from the built extension's machine code (objdump), every level of the packed GEMM: its inner
  loop (the one holding the multiply-adds) keeps its accumulators in registers -- no vector on the stack --
  and uses the level's registers (zmm / ymm / xmm), never a wider one. This is the failure that made the AVX2
  path 10-50x slower than torch: 64-byte vectors on AVX2 spilled every accumulator.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedrnn

pytestmark = pytest.mark.skipif(fusedrnn.extension_error() is not None, reason="needs the C++ extension")

LEVELS = ("avx512", "avx2", "baseline")
TESTS = Path(__file__).parent


def machine_levels() -> list[str]:
    return list(torch.ops.fusedrnn.cpu_isa_levels())


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True,
                          text=True, timeout=300)


def test_levels_reported():
    levels = machine_levels()
    assert levels[-1] == "baseline" and set(levels) <= set(LEVELS)
    active = torch.ops.fusedrnn.cpu_isa()
    wanted = os.environ.get("FUSEDRNN_CPU_ISA", "auto")
    assert active == (levels[0] if wanted in ("", "auto") else wanted)


def test_bad_level_raises():
    out = run_python("import torch, fusedrnn; torch.ops.fusedrnn.cpu_isa()", FUSEDRNN_CPU_ISA="sse9")
    assert out.returncode != 0
    assert "FUSEDRNN_CPU_ISA: expected one of auto, avx512, avx2, baseline, got 'sse9'" in out.stderr


def test_bad_level_raises_from_a_layer_call():
    code = ("import torch, fusedrnn\n"
            "with fusedrnn.use_backend('cpu'):\n"
            "    fusedrnn.LSTM(3, 4)(torch.randn(2, 1, 3))\n")
    out = run_python(code, FUSEDRNN_CPU_ISA="avx3")
    assert out.returncode != 0 and "FUSEDRNN_CPU_ISA" in out.stderr


def test_unsupported_level_raises():
    missing = [lv for lv in LEVELS if lv not in machine_levels()]
    if not missing:
        pytest.skip("this CPU runs every level")
    out = run_python("import torch, fusedrnn; torch.ops.fusedrnn.cpu_isa()", FUSEDRNN_CPU_ISA=missing[0])
    assert out.returncode != 0
    assert f"FUSEDRNN_CPU_ISA={missing[0]}: this CPU does not support it" in out.stderr


@pytest.mark.parametrize("level", LEVELS)
def test_cpu_backend_correct_at_level(level):
    """The cpu backend's tests in a process forced to `level` (the suite itself runs at the best level)."""
    if level not in machine_levels():
        pytest.skip(f"this CPU cannot run {level} (its code is checked by test_gemm_inner_loop_*)")
    if level == machine_levels()[0] and os.environ.get("FUSEDRNN_CPU_ISA", "auto") in ("", "auto"):
        pytest.skip(f"{level} is this CPU's best level: the whole suite runs at it")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_cpu_threads.py"),
           str(TESTS / "test_cpu_isa.py") + "::test_levels_reported",
           str(TESTS / "test_beam_topk.py"), "-k", "cpu or Cpu or not (triton or gpu or cuda)"]
    out = subprocess.run(cmd, env=dict(os.environ, FUSEDRNN_CPU_ISA=level), capture_output=True, text=True,
                         timeout=900, cwd=TESTS.parent)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0, f"{level}: {summary}\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}"
    assert re.search(r"\d+ passed", summary) and "failed" not in summary, summary


# ---------------------------------------------------------------------------------------------------------
# Machine code of each level
# ---------------------------------------------------------------------------------------------------------
def _extension_path() -> str:
    import fusedrnn._C as ext
    return ext.__file__


def _functions(pattern: str) -> dict[str, list[tuple[int, str]]]:
    """{demangled name: [(address, instruction)]} of the extension's functions whose name matches."""
    so = _extension_path()
    syms = subprocess.run(["nm", "-C", "-S", "--defined-only", so], capture_output=True, text=True,
                          check=True).stdout
    out = {}
    for line in syms.splitlines():
        m = re.match(r"([0-9a-f]+) ([0-9a-f]+) [tTwW] (.*)$", line)
        if not m or not re.search(pattern, m.group(3)):
            continue
        start, size = int(m.group(1), 16), int(m.group(2), 16)
        asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={start}",
                              f"--stop-address={start + size}", so], capture_output=True, text=True,
                             check=True).stdout
        ins = []
        for row in asm.splitlines():
            r = re.match(r"\s+([0-9a-f]+):\t(.*)$", row)
            if r:
                ins.append((int(r.group(1), 16), r.group(2)))
        out[m.group(3)] = ins
    return out


def _innermost_loops(ins):
    """Instruction lists of the innermost loops (a backward jump closes each loop)."""
    addrs = [a for a, _ in ins]
    loops = []
    for a, text in ins:
        j = re.match(r"j\w+\s+([0-9a-f]+)", text)
        if j and addrs[0] <= int(j.group(1), 16) <= a:
            loops.append((int(j.group(1), 16), a))
    inner = [(lo, hi) for lo, hi in loops
             if not any((l2, h2) != (lo, hi) and lo <= l2 and h2 <= hi for l2, h2 in loops)]
    return [[t for a, t in ins if lo <= a <= hi] for lo, hi in inner]


needs_x86_binutils = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.uname().machine == "x86_64" and shutil.which("objdump")
         and shutil.which("nm")), reason="reads x86-64 machine code with binutils")
MULTIPLY_ADD = {"avx512": r"^vfmadd\w+p[sd]\s.*%zmm", "avx2": r"^vfmadd\w+p[sd]\s.*%ymm",
                "baseline": r"^mulp[sd]\s"}
WIDER = {"avx512": None, "avx2": r"%zmm", "baseline": r"%[yz]mm"}


@needs_x86_binutils
@pytest.mark.parametrize("dtype", ["float", "double"])
@pytest.mark.parametrize("level", LEVELS)
def test_gemm_inner_loop_keeps_accumulators_in_registers(level, dtype):
    funcs = _functions(rf"gemm_panels_isa_{level}<{dtype}>")
    assert funcs, f"no gemm_panels_isa_{level}<{dtype}> in {_extension_path()}"
    for name, ins in funcs.items():
        # The k loops: MR x 2 multiply-adds per step (the 1- to 4-row tiles of leftover rows have their own);
        # a loop that calls out (memcpy) is a tile's store epilogue, not a k loop.
        fma_loops = [body for body in _innermost_loops(ins)
                     if sum(bool(re.match(MULTIPLY_ADD[level], t)) for t in body) >= 4
                     and not any(t.startswith("call") for t in body)]
        assert fma_loops, f"{name}: no inner loop of {level} multiply-adds"
        for body in fma_loops:
            # vector operands only: with 8 rows of A the AVX-512 tile reloads a few row pointers (integer
            # registers) from the stack, which costs load slots, not the accumulators' round trips
            on_stack = [t for t in body if re.search(r"\(%r[sb]p\)", t) and re.search(r"%[xyz]mm", t)]
            assert not on_stack, f"{name}: inner loop moves vectors through the stack: {on_stack[:4]}"
        if WIDER[level]:
            wide = [t for _, t in ins if re.search(WIDER[level], t)]
            assert not wide, f"{name}: registers wider than {level}'s: {wide[:4]}"


@needs_x86_binutils
@pytest.mark.parametrize("level", ["avx2", "baseline"])
def test_no_wider_registers_than_the_level(level):
    """Every function of a level (GEMM, packing, pointwise rows, beam top-k scans) stays in its registers: an
    AVX-512 instruction in the AVX2 path would crash a Zen 3 (SIGILL)."""
    funcs = _functions(rf"_{level}<(float|double)>\(")
    assert len(funcs) >= 20, sorted(funcs)
    for name, ins in funcs.items():
        wide = [t for _, t in ins if re.search(WIDER[level], t)]
        assert not wide, f"{name}: registers wider than {level}'s: {wide[:4]}"
