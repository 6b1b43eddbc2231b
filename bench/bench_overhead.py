"""Per-call overhead at tiny sizes: fusedrnn's module call against torch.nn's, same weights, interleaved.

At H=8-64, B=1 the kernels take microseconds and what a call costs is mostly Python and dispatch; decoding
loops call a cell once per token, so this is what they pay. For every module and cell, H in {8, 64}, T in
{1, 16} (layers), no_grad and with grad, it times `rounds` rounds, each one block of `calls` calls of
torch.nn then one of fusedrnn (so both see the same machine state), and prints the medians and their ratio.

    python bench/bench_overhead.py [--threads 1] [--calls 300] [--rounds 15] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import fusedrnn

MODULES = ("LSTMCell", "GRUCell", "RNNCell", "LSTM", "GRU", "RNN")


def _block(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def measure(name: str, hidden: int, seq_len: int, grad: bool, calls: int, rounds: int) -> dict:
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(hidden, hidden)
    ours = getattr(fusedrnn, name)(hidden, hidden)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, hidden) if "Cell" in name else torch.randn(seq_len, 1, hidden)
    context = torch.enable_grad if grad else torch.no_grad
    with context():
        for fn in (lambda: ref(x), lambda: ours(x)):  # warm up both (dispatch caches, allocator)
            _block(fn, calls)
        times = [(_block(lambda: ref(x), calls), _block(lambda: ours(x), calls)) for _ in range(rounds)]
    torch_us = statistics.median(t for t, _ in times)
    ours_us = statistics.median(o for _, o in times)
    return {"module": name, "H": hidden, "T": 1 if "Cell" in name else seq_len, "B": 1, "grad": grad,
            "torch_us": round(torch_us, 2), "fusedrnn_us": round(ours_us, 2),
            "ratio": round(ours_us / torch_us, 3),
            "backend": fusedrnn.explain(ours, x).backends[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=300, help="calls per timed block")
    p.add_argument("--rounds", type=int, default=15, help="interleaved blocks per provider")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--modules", default=",".join(MODULES), help="comma-separated subset of " + ", ".join(MODULES))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'module':9s} {'H':>3s} {'T':>3s} {'grad':>4s} {'torch.nn us':>11s} {'fusedrnn us':>11s} "
          f"{'ratio':>6s}  backend")
    for name in args.modules.split(","):
        for hidden in (8, 64):
            for seq_len in ((1,) if "Cell" in name else (1, 16)):
                for grad in (False, True):
                    r = measure(name, hidden, seq_len, grad, args.calls, args.rounds)
                    rows.append(r)
                    print(f"{r['module']:9s} {r['H']:3d} {r['T']:3d} {int(r['grad']):4d} {r['torch_us']:11.1f} "
                          f"{r['fusedrnn_us']:11.1f} {r['ratio']:6.2f}  {r['backend']}", flush=True)
    worst = max(rows, key=lambda r: r["ratio"])
    print(f"worst ratio {worst['ratio']:.2f} ({worst['module']} H={worst['H']} T={worst['T']} grad={worst['grad']}); "
          f"{sum(r['ratio'] <= 1.0 for r in rows)}/{len(rows)} rows at or below torch.nn")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
