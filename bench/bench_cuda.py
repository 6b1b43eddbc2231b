"""Benchmark of the "cuda" backend against cuDNN (torch.nn.LSTM / GRU) on one GPU: issue #5's grid.

    python bench/bench_cuda.py                          # the whole grid, every path choice, fwd and fwd+bwd
    python bench/bench_cuda.py --list                   # the cases, without running (works on a CPU machine)
    python bench/bench_cuda.py --cells lstm --dtypes fp16 --batches 16 --hidden 768 --seq 1024
    python bench/bench_cuda.py --shard 1/4              # a quarter of the cases (device calls are 10 minutes)

Grid: {lstm, gru} x {fp16, bf16, fp32} x B {1, 8, 16, 64, 256} x H {256, 512, 768, 1024, 2048} x T {64, 1024},
one layer, one direction, input size = H (DeepBench's convention), modes fwd (no grad) and fwdbwd; plus the case
where cuDNN runs its persistent kernel: fp16 LSTM H=768 B=16 T=1024 (cuDNN ~1.96 us/step on H100).
Providers: "cudnn" (torch.nn), "cuda:auto" (fusedrnn's heuristic) and "cuda:<path>" for each forced path
(FUSEDRNN_CUDA_PATH); a path that refuses a case is recorded with its reason. Every fusedrnn output is checked
against cuDNN's before timing (loose bounds: a garbage detector, precision is the tests' job).

Timing: CUDA events around each call, `--warmup` calls first, the median of `--repeats`; reported per call (ms)
and per time step (us), and as speedup = cuDNN time / fusedrnn time. `--tf32 on` (default) lets both cuDNN and
fusedrnn use TF32 for fp32 (torch.backends.cudnn.allow_tf32 / cuda.matmul.allow_tf32), so fp32 compares like with
like; `off` runs both in full fp32 (then fusedrnn's persistent paths refuse fp32).
Targets (issue #8): >= 1.25x cuDNN where cuDNN runs persistent, >= 2x geometric mean, never slower.
Output: a table on stdout, results.csv and results.json (rows + environment) in --out.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fusedrnn  # noqa: E402
from fusedrnn.bench.timing import measure  # noqa: E402
from fusedrnn.backends import BackendUnsupportedError, LayerCall, scoped_environ  # noqa: E402
from fusedrnn.backends import cuda as cuda_backend  # noqa: E402

CELLS = ("lstm", "gru")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BATCHES = (1, 8, 16, 64, 256)
HIDDEN = (256, 512, 768, 1024, 2048)
SEQ = (64, 1024)
MODES = ("fwd", "fwdbwd")
PROVIDERS = ("cudnn", "cuda:auto", "cuda:alternating", "cuda:persistent", "cuda:cluster")
CUDNN_PERSISTENT_CASE = ("lstm", "fp16", 16, 768, 1024)  # cell, dtype, B, H, T
# max |fusedrnn - cuDNN| / max(1, |cuDNN|) above which a result is garbage, not rounding.
GARBAGE = {"fp32": 1e-2, "fp16": 5e-2, "bf16": 2e-1}


@dataclass(frozen=True)
class Case:
    cell: str
    dtype: str
    batch: int
    hidden: int
    seq: int
    mode: str

    @property
    def id(self) -> str:
        return f"{self.cell}-{self.dtype}-B{self.batch}-H{self.hidden}-T{self.seq}-{self.mode}"


@dataclass
class Row:
    case: str
    cell: str
    dtype: str
    batch: int
    hidden: int
    seq: int
    mode: str
    provider: str
    status: str                       # ok | refused | mismatch | error
    ms: Optional[float] = None        # median per call
    us_per_step: Optional[float] = None
    speedup: Optional[float] = None   # cuDNN time / this time
    max_error: Optional[float] = None
    paths: str = ""                   # the cuda paths that ran: forward[/backward]
    note: str = ""


def cases(args) -> list[Case]:
    grid = [Case(c, d, b, h, t, m) for c, d, b, h, t, m in itertools.product(
        args.cells, args.dtypes, args.batches, args.hidden, args.seq, args.modes)]
    cell, dtype, b, h, t = CUDNN_PERSISTENT_CASE
    if not args.no_extra:
        for mode in args.modes:
            extra = Case(cell, dtype, b, h, t, mode)
            if extra not in grid:
                grid.append(extra)
    k, n = args.shard
    return grid[k - 1::n]


@contextlib.contextmanager
def provider_context(provider: str):
    """fusedrnn's backend "cuda" on a path, also through the environment for autograd's backward thread."""
    if provider == "cudnn":
        yield
        return
    path = provider.split(":", 1)[1]
    with scoped_environ({"FUSEDRNN_BACKEND": "cuda", cuda_backend.PATH_ENV: path}), fusedrnn.use_backend("cuda"):
        yield


def make_modules(case: Case):
    dtype = DTYPES[case.dtype]
    torch_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[case.cell]
    fused_cls = {"lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU}[case.cell]
    ref = torch_cls(case.hidden, case.hidden).to(device="cuda", dtype=dtype)
    mine = fused_cls(case.hidden, case.hidden).to(device="cuda", dtype=dtype)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def time_call(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` calls, CUDA events around each (the CLI's timer)."""
    times = measure({"fn": (fn, contextlib.nullcontext)}, torch.device("cuda"), warmup, repeats)["fn"]
    return statistics.median(times)


def paths_used(case: Case, mine, x, provider: str) -> str:
    """The cuda paths fusedrnn takes for this case: forward, and backward in fwdbwd mode."""
    if provider == "cudnn":
        return ""
    p = mine.weight_hh_l0
    H, B = case.hidden, case.batch
    h0 = x.new_zeros(B, H)
    call = LayerCall(case.cell, x, h0, h0 if case.cell == "lstm" else None, mine.weight_ih_l0, p,
                     mine.bias_ih_l0, mine.bias_hh_l0, None, None, False)
    with provider_context(provider):
        fwd = cuda_backend.choose_path(call, "forward")
        return fwd if case.mode == "fwd" else f"{fwd}/{cuda_backend.choose_path(call, 'backward')}"


def run_case(case: Case, providers, args) -> list[Row]:
    ref, mine = make_modules(case)
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.seq, case.batch, case.hidden, device="cuda", dtype=dtype)
    xg = x.clone().requires_grad_(case.mode == "fwdbwd")
    rows, base = [], None
    with torch.no_grad():
        y_ref = ref(x)[0]
    scale = max(1.0, y_ref.abs().max().item())

    def run(module):
        if case.mode == "fwd":
            with torch.no_grad():
                module(x)
        else:
            y = module(xg)[0]
            y.backward(torch.ones_like(y))

    for provider in providers:
        module = ref if provider == "cudnn" else mine
        row = Row(case.id, case.cell, case.dtype, case.batch, case.hidden, case.seq, case.mode, provider, "ok")
        try:
            with provider_context(provider):
                if provider != "cudnn":
                    with torch.no_grad():
                        err = (module(x)[0].double() - y_ref.double()).abs().max().item() / scale
                    row.max_error = err
                    row.paths = paths_used(case, mine, x, provider)
                    if not math.isfinite(err) or err > GARBAGE[case.dtype]:
                        row.status = "mismatch"
                        rows.append(row)
                        continue
                row.ms = time_call(lambda: run(module), args.warmup, args.repeats)
        except BackendUnsupportedError as e:
            row.status, row.note = "refused", str(e).split(": ", 1)[-1][:300]
        except RuntimeError as e:  # a kernel error, or out of memory: recorded, the run goes on
            row.status, row.note = "error", str(e).splitlines()[0][:300]
            torch.cuda.empty_cache()
        if row.ms is not None:
            row.us_per_step = 1000.0 * row.ms / case.seq
            if provider == "cudnn":
                base = row.ms
            elif base is not None:
                row.speedup = base / row.ms
        rows.append(row)
    return rows


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "commit": commit or os.environ.get("FUSEDRNN_COMMIT", ""), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "tf32": torch.backends.cuda.matmul.allow_tf32}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def print_table(rows: list[Row]) -> None:
    print(f"{'case':40} {'provider':17} {'status':8} {'ms':>9} {'us/step':>9} {'speedup':>8}  paths / note")
    for r in rows:
        ms = f"{r.ms:9.3f}" if r.ms is not None else " " * 9
        us = f"{r.us_per_step:9.2f}" if r.us_per_step is not None else " " * 9
        sp = f"{r.speedup:7.2f}x" if r.speedup is not None else " " * 8
        print(f"{r.case:40} {r.provider:17} {r.status:8} {ms} {us} {sp}  {r.paths or r.note}")


def summarize(rows: list[Row]) -> list[str]:
    lines = []
    for provider in sorted({r.provider for r in rows} - {"cudnn"}):
        speedups = [r.speedup for r in rows if r.provider == provider and r.speedup]
        if not speedups:
            continue
        geo = math.exp(sum(map(math.log, speedups)) / len(speedups))
        slower = sum(s < 1 for s in speedups)
        lines.append(f"{provider}: geometric mean {geo:.2f}x over {len(speedups)} cases, min {min(speedups):.2f}x, "
                     f"slower than cuDNN in {slower}")
    cell, dtype, b, h, t = CUDNN_PERSISTENT_CASE
    for r in rows:
        if (r.cell, r.dtype, r.batch, r.hidden, r.seq) == (cell, dtype, b, h, t) and r.provider == "cuda:auto":
            target = "meets" if r.speedup and r.speedup >= 1.25 else "misses"
            sp = f"{r.speedup:.2f}x" if r.speedup else r.status
            lines.append(f"cuDNN-persistent case {r.case}: {sp} ({target} the 1.25x target)")
    return lines


def parse_args(argv=None):
    def csv_of(kind, choices=None):
        def parse(text):
            items = [kind(v.strip()) for v in text.split(",") if v.strip()]
            if choices is not None:
                bad = [v for v in items if v not in choices]
                if bad:
                    raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
            return items
        return parse

    def shard(text):
        k, _, n = text.partition("/")
        if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
            raise argparse.ArgumentTypeError("expected K/N with 1 <= K <= N")
        return int(k), int(n)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=csv_of(str, CELLS), default=list(CELLS))
    p.add_argument("--dtypes", type=csv_of(str, DTYPES), default=list(DTYPES))
    p.add_argument("--batches", type=csv_of(int), default=list(BATCHES))
    p.add_argument("--hidden", type=csv_of(int), default=list(HIDDEN))
    p.add_argument("--seq", type=csv_of(int), default=list(SEQ))
    p.add_argument("--modes", type=csv_of(str, MODES), default=list(MODES))
    p.add_argument("--providers", type=csv_of(str, PROVIDERS), default=list(PROVIDERS),
                   help="cudnn is always run first (it is the baseline)")
    p.add_argument("--no-extra", action="store_true", help="leave out the cuDNN-persistent case when off-grid")
    p.add_argument("--shard", type=shard, default=(1, 1), help="run the K-th of N interleaved slices")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tf32", choices=("on", "off"), default="on")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / f"cuda-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    args = p.parse_args(argv)
    args.providers = ["cudnn"] + [q for q in args.providers if q != "cudnn"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    todo = cases(args)
    if args.list:
        for c in todo:
            print(c.id)
        print(f"{len(todo)} cases x {len(args.providers)} providers")
        return 0
    if not torch.cuda.is_available():
        print("bench_cuda: needs a CUDA device (use --list to see the cases)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    rows: list[Row] = []
    for i, case in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {case.id}", file=sys.stderr, flush=True)
        try:
            rows += run_case(case, args.providers, args)
        except torch.OutOfMemoryError as e:
            rows.append(Row(case.id, case.cell, case.dtype, case.batch, case.hidden, case.seq, case.mode, "cudnn",
                            "error", note=str(e).splitlines()[0][:300]))
        torch.cuda.empty_cache()
    print_table(rows)
    summary = summarize(rows)
    print("\n".join(summary))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]))) if rows else None
        if writer:
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    with open(args.out / "results.json", "w") as f:
        json.dump({"environment": environment(), "summary": summary, "rows": [asdict(r) for r in rows]}, f,
                  indent=1)
    print(f"wrote {args.out / 'results.csv'} and results.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
