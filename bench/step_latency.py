"""Per-step latency of every CUDA path against cuDNN, and the synchronisation floor (issue #17, quick plan).

    python bench/step_latency.py --out DIR                 # on a GPU: the quick grid below, ~2 minutes
    python bench/step_latency.py --device cpu --out DIR    # rehearsal on the emulated CUDA backend (tiny sizes)

Per case (cell, H, B, dtype, mode) and provider -- "cudnn" (torch.nn) and "cuda:<path>" for each path forced
with FUSEDRNN_CUDA_PATH -- the call is timed at two sequence lengths and the per-step latency is the slope,
(t(T2) - t(T1)) / (T2 - T1), so launch and setup costs cancel. Each fusedrnn output is first checked against
cuDNN's (a garbage detector; precision is the tests' job); a path that refuses a case is listed with its reason.
Beside each path: the latency model's estimate (fusedrnn/backends/cuda_latency.py), so a GPU run checks the
model term by term. The synchronisation floor: the persistent paths at H=32, B=1, where a step is nothing but
its barrier and exchange.

Grid (issue #17): LSTM, H {256, 768, 1024} x B {1, 16, 64}, fp16 and bf16, fwd and fwd+bwd, T 256 and 1024;
targets where cuDNN runs its persistent kernel (fp16 LSTM, H % 128 == 0, B % 8 == 0): fusedrnn >= 1.25x.
Output: a table on stdout, step_latency.json and step_latency.csv in --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fusedrnn  # noqa: E402
from fusedrnn.backends import scoped_environ  # noqa: E402
from fusedrnn.backends import cuda_latency  # noqa: E402
from fusedrnn.backends.cuda import PATH_ENV, PATHS  # noqa: E402
from fusedrnn.bench.timing import measure  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
GARBAGE = {"fp32": 1e-2, "fp16": 5e-2, "bf16": 2e-1}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _modules(cell: str, H: int, dtype, device):
    torch.manual_seed(0)
    cls = {"lstm": "LSTM", "gru": "GRU"}[cell]
    ref = getattr(torch.nn, cls)(H, H).to(device=device, dtype=dtype)
    ours = getattr(fusedrnn, cls)(H, H).to(device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _provider_context(name: str, backend: str):
    if name == "cudnn":
        return lambda: scoped_environ({})
    path = name.split(":", 1)[1]
    return lambda: scoped_environ({"FUSEDRNN_BACKEND": backend, PATH_ENV: path})


def _call(module, x, mode: str):
    def run():
        if mode == "fwd":
            with torch.no_grad():
                return module(x)[0]
        y = module(x)[0]
        y.float().sum().backward()
        return y
    return run


def _refusal(ours, x, mode: str, backend: str, path: str):
    """None when the forced path runs the call (forward and, for fwdbwd, backward), else the reason."""
    try:
        with scoped_environ({"FUSEDRNN_BACKEND": backend, PATH_ENV: path}):
            _call(ours, x[:3], mode)()  # a short call: refusals do not depend on T
    except fusedrnn.BackendUnsupportedError as e:
        return str(e).split(": ", 1)[-1][:160]
    return None


def run_case(cell, H, B, dname, mode, seqs, providers, device, backend, warmup, repeats, max_seconds):
    dtype = DTYPES[dname]
    ref, ours = _modules(cell, H, dtype, device)
    xs = {T: torch.randn(T, B, H, device=device, dtype=dtype) for T in seqs}
    if mode == "fwdbwd":
        for x in xs.values():
            x.requires_grad_(True)
    rows = []
    steps = {}
    refused = {}
    for name in providers:
        module = ref if name == "cudnn" else ours
        if name != "cudnn":
            why = _refusal(ours, xs[seqs[0]], mode, backend, name.split(":", 1)[1])
            if why:
                refused[name] = why
                continue
            with _provider_context(name, backend)(), torch.no_grad():  # garbage detector
                got = ours(xs[seqs[0]])[0].float()
                want = ref(xs[seqs[0]])[0].float()
            err = ((got - want).abs().max() / want.abs().max().clamp(min=1)).item()
            if not err <= GARBAGE[dname]:
                refused[name] = f"WRONG: max relative error {err:.3g} vs cuDNN"
                continue
        for T in seqs:
            steps[(name, T)] = (_call(module, xs[T], mode), _provider_context(name, backend))
    times = measure({k: v for k, v in steps.items()}, torch.device(device), warmup, repeats, max_seconds)
    direction_est = {}
    for direction in ("forward", "backward"):
        direction_est[direction] = cuda_latency.estimates(cell, H, B, dtype, direction)
    t1, t2 = seqs[0], seqs[-1]
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    cudnn_us = None
    for name in providers:
        row = {"cell": cell, "H": H, "B": B, "dtype": dname, "mode": mode, "provider": name}
        if name in refused:
            row["refused"] = refused[name]
        else:
            ms1, ms2 = median(times[(name, t1)]), median(times[(name, t2)])
            row.update(ms={t1: ms1, t2: ms2}, us_per_step=(ms2 - ms1) * 1e3 / (t2 - t1))
            if name == "cudnn":
                cudnn_us = row["us_per_step"]
        if name.startswith("cuda:"):
            path = name.split(":", 1)[1]
            est = direction_est["forward"][path].per_step_us
            if mode == "fwdbwd":
                est += direction_est["backward"][path].per_step_us
            row["model_us_per_step"] = None if math.isinf(est) else est
        rows.append(row)
    for row in rows:
        if cudnn_us and row.get("us_per_step"):
            row["speedup_vs_cudnn"] = cudnn_us / row["us_per_step"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cells", default="lstm")
    ap.add_argument("--hidden", default=None, help="default 256,768,1024 (cpu rehearsal: 32)")
    ap.add_argument("--batch", default=None, help="default 1,16,64 (cpu rehearsal: 3)")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--seq", default=None, help="two lengths, default 256,1024 (cpu rehearsal: 2,4)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--max-seconds", type=float, default=2.0, help="per case and provider")
    ap.add_argument("--time-limit", type=float, default=math.inf, help="no new case after this many seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        print("step_latency: no CUDA device; use --device cpu for the emulated rehearsal", file=sys.stderr)
        return 2
    backend = "cuda" if gpu else "cuda-emu"
    if not gpu:
        os.environ.setdefault("FUSEDRNN_EMU_QUIET", "1")
    hidden = _ints(args.hidden or ("256,768,1024" if gpu else "32"))
    batches = _ints(args.batch or ("1,16,64" if gpu else "3"))
    seqs = _ints(args.seq or ("256,1024" if gpu else "2,4"))
    if len(seqs) != 2 or seqs[0] >= seqs[1]:
        ap.error("--seq: two increasing lengths")
    providers = ["cudnn"] + [f"cuda:{p}" for p in PATHS]
    cases = [(c, H, B, d, m) for c in args.cells.split(",") for d in args.dtypes.split(",")
             for m in args.modes.split(",") for H in hidden for B in batches]
    sync_floor = [(c, 32, 1, d, m) for c in args.cells.split(",")[:1] for d in args.dtypes.split(",")[:1]
                  for m in ("fwd",)]
    start = time.perf_counter()
    rows = []
    print(f"per-step latency (us), slope over T={seqs[0]}..{seqs[1]}; device {args.device} ({backend}); "
          f"model = fusedrnn/backends/cuda_latency.py (H100)")
    print(f"{'case':<30}{'provider':<18}{'us/step':>9}{'model':>8}{'vs cuDNN':>10}  note")
    for kind, case_list in (("grid", cases), ("sync floor", sync_floor)):
        for case in case_list:
            if time.perf_counter() - start > args.time_limit:
                print(f"Stopped early: time limit {args.time_limit:.0f}s reached")
                break
            case_rows = run_case(*case, seqs, providers, args.device, backend, args.warmup, args.repeats,
                                 args.max_seconds)
            for r in case_rows:
                r["kind"] = kind
                label = f"{r['cell']} H={r['H']} B={r['B']} {r['dtype']} {r['mode']}"
                us = f"{r['us_per_step']:.2f}" if r.get("us_per_step") is not None else "-"
                model = f"{r['model_us_per_step']:.2f}" if r.get("model_us_per_step") else "-"
                speed = f"{r['speedup_vs_cudnn']:.2f}x" if r.get("speedup_vs_cudnn") else ""
                print(f"{label:<30}{r['provider']:<18}{us:>9}{model:>8}{speed:>10}  {r.get('refused', '')}",
                      flush=True)
            rows += case_rows
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if gpu else "cpu (cuda-emu)",
               "commit": os.environ.get("FUSEDRNN_COMMIT", ""), "seq": seqs}
        (out / "step_latency.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))
        keys = ["kind", "cell", "H", "B", "dtype", "mode", "provider", "us_per_step", "model_us_per_step",
                "speedup_vs_cudnn", "refused"]
        with open(out / "step_latency.csv", "w", newline="") as f:
            w = csv.DictWriter(f, keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {out / 'step_latency.json'} and step_latency.csv")
    wrong = [r for r in rows if str(r.get("refused", "")).startswith("WRONG")]
    return 3 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
