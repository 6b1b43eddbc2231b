"""Do the emulated-kernel tests bite? Plants one known kernel bug at a time in a copy of csrc/ and shows how each is
caught: by values (the cuda-emu tests of tests/test_cuda.py / test_beam_topk.py against the spec), by the
emulator itself (a deadlock, a cp.async never waited for), or by ThreadSanitizer (tests/emu/harness.cpp).

    python tests/emu/mutate.py                 # every mutation (~2 min each on 2 cores), prints a table
    python tests/emu/mutate.py --only no-cp-async-wait,swap-mma-fragments

Needs the in-place build of fusedrnn._C_emu (python setup.py build_ext --inplace): only the mutated kernel's
translation unit is recompiled; the rest of the library is relinked from build/.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Mutation:
    name: str
    bug: str
    file: str          # under csrc/
    old: str
    new: str
    tests: str         # pytest -k expression over the cuda-emu tests that should see it
    tsan: bool = False  # also run the TSan harness
    more: tuple = ()    # further (old, new) replacements in the same file


MUTATIONS = [
    Mutation("swap-mma-fragments", "A fragment registers a0/a1 swapped in mma_block", "cuda/rnn_persistent.cu",
             "mma_k<T>(c, lo.v[i].x, hi.v[i].x, lo.v[i].y, hi.v[i].y, b.v[i].x, b.v[i].y);",
             "mma_k<T>(c, hi.v[i].x, lo.v[i].x, lo.v[i].y, hi.v[i].y, b.v[i].x, b.v[i].y);",
             "test_layer_matches_reference and persistent and fp16"),
    Mutation("no-syncthreads-after-stage", "__syncthreads missing after the cp.async stage of B", "cuda/rnn_persistent.cu",
             "  ptx::cp_async_wait_all();\n  __syncthreads();\n}", "  ptx::cp_async_wait_all();\n}",
             "test_odd_shapes and persistent and H129 and fp16", tsan=True),
    Mutation("no-cp-async-wait", "cp.async issued, never waited for", "cuda/rnn_persistent.cu",
             "  ptx::cp_async_wait_all();\n  __syncthreads();\n}", "  __syncthreads();\n}",
             "test_layer_matches_reference and persistent and fp16"),
    Mutation("grid-barrier-no-wait", "grid exchange that does not wait for the other CTAs' flags", "cuda/rnn_persistent.cu",
             "  if (static_cast<int>(threadIdx.x) < ctas) {  // the planner keeps ctas <= kThreads",
             "  if (false && static_cast<int>(threadIdx.x) < ctas) {  // the planner keeps ctas <= kThreads",
             "test_odd_shapes and persistent and H129 and fp16", tsan=True),
    Mutation("grid-poll-no-acquire", "grid flags polled with relaxed loads only (the acquire load dropped)",
             "cuda/rnn_persistent.cu",
             "    while (ptx::ld_acquire_gpu(f) < epochs) {  // once: the flag only grows\n    }\n", "",
             "test_odd_shapes and persistent and H129 and fp16", tsan=True),
    Mutation("slices-no-wait", "slice staging that does not wait for the producer's flag", "cuda/rnn_persistent.cu",
             "    while (ptx::ld_relaxed_gpu(f) < epochs) {\n    }\n    while (ptx::ld_acquire_gpu(f) < epochs) {  // once; then this producer's slice\n    }\n    const int vecs",
             "    const int vecs",
             "test_odd_shapes and persistent and H129 and fp32", tsan=True),
    Mutation("slices-no-acquire", "slice staging after the relaxed poll only (the acquire load dropped)",
             "cuda/rnn_persistent.cu",
             "    while (ptx::ld_acquire_gpu(f) < epochs) {  // once; then this producer's slice\n    }\n", "",
             "test_odd_shapes and persistent and H129 and fp32", tsan=True),
    Mutation("slices-wrong-producer", "slice staged at the next producer's columns", "cuda/rnn_persistent.cu",
             "      const int col = seg * seg_stride + producer * units;",
             "      const int col = seg * seg_stride + ((producer + 1) % ctas) * units;",
             "test_odd_shapes and persistent and H129 and fp32"),
    Mutation("cluster-read-before-wait", "cluster forward reads the exchanged h before its barrier.cluster.wait",
             "cuda/rnn_persistent.cu",
             "        if (s > 0) ptx::cluster_wait_acquire();\n", "",
             "test_odd_shapes and cluster and H129 and fp16", tsan=True,
             more=(("      // 3. Publish h_t (epoch s + 1)",
                    "      if constexpr (kCluster) {\n        if (s > 0) ptx::cluster_wait_acquire();\n      }\n"
                    "      // 3. Publish h_t (epoch s + 1)"),)),
    Mutation("lengths-off-by-one", "lengths mask t <= len instead of t < len", "cuda/rnn_device.cuh",
             "return lengths == nullptr || t < lengths[b];", "return lengths == nullptr || t <= lengths[b];",
             "test_layer_matches_reference and lengths and fp32"),
    Mutation("reverse-previous-step", "reversed sequence: wrong previous step (t+1 <= len)", "cuda/rnn_device.cuh",
             "return t + 1 < len ? t + 1 : -1;", "return t + 1 <= len ? t + 1 : -1;",
             "test_layer_matches_reference and rev and lstm and lengths"),
    Mutation("beam-tie-highest-token", "beam tie rule: the higher token wins a tie", "cuda/beam_topk.cu",
             "return (static_cast<uint64_t>(high) << 32) | static_cast<uint64_t>(0xffffffffu - index);",
             "return (static_cast<uint64_t>(high) << 32) | static_cast<uint64_t>(index);",
             "cuda-emu"),
    Mutation("tf32-no-rounding", "fp32 MMA operands not rounded to tf32 (cvt.rna dropped)", "cuda/rnn_persistent.cu",
             "  return __uint_as_float(ptx::cvt_rna_tf32(v));", "  return v;",
             "test_workspace_layout_equals_reference and persistent"),
]
KERNEL_TUS = {"cuda/rnn_persistent.cu": "rnn_persistent_emu", "cuda/rnn_pointwise.cu": "rnn_pointwise_emu",
              "cuda/beam_topk.cu": "beam_topk_emu", "cuda/rnn_device.cuh": None}


def cuda_include() -> str:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return os.path.join(home, "include")
    import nvidia
    return os.path.join(list(nvidia.__path__)[0], "cu13", "include")


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def build_library(src: Path, tus: list[str], out: Path) -> None:
    """Recompiles `tus` (csrc/emu/<tu>.cpp against the mutated tree `src`) and relinks _C_emu from build/."""
    import torch.utils.cpp_extension as ce
    objs = {Path(o).stem: o for o in glob.glob(str(ROOT / "build" / "temp*" / "csrc" / "emu" / "*.o"))}
    if not objs:
        sys.exit("no build/temp*/csrc/emu/*.o: run python setup.py build_ext --inplace first")
    flags = ["-std=c++20", "-O2", "-fPIC", "-fvisibility=hidden", "-DFUSEDRNN_EMU", "-Wno-unknown-pragmas",
             f"-I{src / 'emu' / 'include'}", f"-I{src}", f"-I{cuda_include()}"]
    for tu in tus:
        obj = out.parent / f"{tu}.o"
        p = run(["g++", *flags, "-c", str(src / "emu" / f"{tu}.cpp"), "-o", str(obj)])
        if p.returncode != 0:
            raise RuntimeError(f"compile {tu}: {p.stderr[-2000:]}")
        objs[tu] = str(obj)
    import torch
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    p = run(["g++", "-shared", "-o", str(out), *objs.values(), f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch",
             "-Wl,-Bsymbolic", "-lboost_context", "-pthread", f"-Wl,-rpath,{lib}"])
    if p.returncode != 0:
        raise RuntimeError(f"link: {p.stderr[-2000:]}")


def values_caught(lib: Path, tests: str) -> tuple[bool, str]:
    env = dict(os.environ, FUSEDRNN_EMU_LIBRARY=str(lib), FUSEDRNN_EMU_WATCHDOG_S="10")
    files = ["tests/test_beam_topk.py"] if "beam" in str(tests) or tests == "cuda-emu" else ["tests/test_cuda.py"]
    k = tests if tests == "cuda-emu" else f"cuda-emu and {tests}"
    p = run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files, "-k", k], cwd=ROOT, env=env,
            timeout=900)
    tail = [line for line in p.stdout.splitlines() if line.startswith(("FAILED", "E  ")) or "passed" in line]
    if p.returncode == 0:
        return False, (tail[-1] if tail else "passed")
    first_e = next((line.strip() for line in p.stdout.splitlines() if line.startswith("E ")), "")
    failed = next((line for line in p.stdout.splitlines() if line.startswith("FAILED")), "")
    return True, (failed.split(" - ")[0].replace("FAILED ", "") + " | " + first_e)[:160]


def tsan_caught(src: Path, work: Path) -> tuple[bool, str]:
    env = dict(os.environ, FUSEDRNN_SANITIZER_DIR=str(ROOT / "build" / "emu-sanitizers"))  # objects reused
    script = ROOT / "tests" / "emu" / "run_sanitizers.sh"
    # the script builds from the tree it lives in: run a copy of it inside the mutated tree
    tree = src.parent
    shutil.copytree(ROOT / "tests" / "emu", tree / "tests" / "emu", dirs_exist_ok=True)
    p = run(["bash", str(tree / "tests" / "emu" / "run_sanitizers.sh"), "tsan"], cwd=tree, env=env, timeout=900)
    del script
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("FAIL")), "")
    report = next((ln.strip() for ln in p.stdout.splitlines() if "WARNING: ThreadSanitizer" in ln or "FAIL:" in ln
                   or "deadlock" in ln or "watchdog" in ln), "")
    return p.returncode != 0, (line + " | " + report)[:160]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated mutation names")
    ap.add_argument("--no-tsan", action="store_true")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    rows = []
    for m in chosen:
        start = time.time()
        with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
            tree = Path(tmp)
            src = tree / "csrc"
            shutil.copytree(ROOT / "csrc", src)
            path = src / m.file
            text = path.read_text()
            for old, new in ((m.old, m.new), *m.more):
                assert text.count(old) == 1, f"{m.name}: the original text is not found once in {m.file}"
                text = text.replace(old, new)
            path.write_text(text)
            tus = [KERNEL_TUS[m.file]] if KERNEL_TUS[m.file] else ["rnn_persistent_emu", "rnn_pointwise_emu"]
            lib = tree / "libmutant.so"
            build_library(src, tus, lib)
            by_values, why_values = values_caught(lib, m.tests)
            by_tsan, why_tsan = (tsan_caught(src, tree) if m.tsan and not args.no_tsan else (None, "not run"))
        caught = by_values or bool(by_tsan)
        rows.append((m, by_values, why_values, by_tsan, why_tsan, time.time() - start))
        print(f"{m.name:28} {'CAUGHT' if caught else 'MISSED':7} values={by_values} tsan={by_tsan} "
              f"({time.time() - start:.0f} s)\n    values: {why_values}\n    tsan:   {why_tsan}", flush=True)
    print("\n| bug | caught by values | caught by TSan | first evidence |\n|---|---|---|---|")
    for m, bv, wv, bt, wt, _ in rows:
        evidence = wv if bv else wt
        print(f"| {m.bug} | {'yes' if bv else 'no'} | {'-' if bt is None else ('yes' if bt else 'no')} | "
              f"{evidence.replace('|', '/')} |")
    missed = [m.name for m, bv, _, bt, _, _ in rows if not (bv or bt)]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} planted bugs caught" + (f"; missed: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
