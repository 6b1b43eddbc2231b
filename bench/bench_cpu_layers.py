"""CPU benchmark of the "cpu" backend against torch.nn (ATen / oneDNN) on the CPU, fp32, in one run.

    python bench/bench_cpu_layers.py [--repeats 5] [--cells lstm,gru,rnn_tanh] [--shapes 64,1,256,256 ...]
    python bench/bench_cpu_layers.py --isa all --threads 2      # every level this CPU runs, torch capped alike
    python bench/bench_cpu_layers.py --isa avx2 --busy 1        # with another process spinning on one core

Prints a table of median times (forward; forward+backward) and the speedup fusedrnn/torch per shape, and
the geometric mean per cell. Weights are shared (state_dict copy), so both compute the same function;
outputs are compared before timing. --isa LEVEL runs the table in a fresh process with fusedrnn's cpu kernels
AND torch (ATen, oneDNN, MKL) capped to that level (fusedrnn/bench/isa.py).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fusedrnn.bench import isa  # noqa: E402  (imports no torch: --isa must set the environment first)

if __name__ == "__main__" and "--isa" in sys.argv and not isa.in_level_child():
    _p = argparse.ArgumentParser(add_help=False)
    _p.add_argument("--isa")
    _known, _rest = _p.parse_known_args()
    _status = 0
    for _level in isa.requested_levels(_known.isa):
        _status |= isa.run_at_level(_level, [os.path.abspath(__file__)] + _rest)
    sys.exit(_status)

import torch  # noqa: E402

import fusedrnn  # noqa: E402

DEFAULT_SHAPES = [(64, 1, 256, 256), (64, 16, 256, 256), (128, 64, 512, 512), (32, 8, 1024, 1024)]
TORCH = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN, "rnn_relu": torch.nn.RNN}
FUSED = {"lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU, "rnn_tanh": fusedrnn.RNN, "rnn_relu": fusedrnn.RNN}


def _time_pair(fn_a, fn_b, repeats, warmup=1):
    """Median wall times of two functions timed in alternation, so load from other processes hits both."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def _modules(cell, I, H):
    kw = {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}
    ref = TORCH[cell](I, H, **kw)
    fused = FUSED[cell](I, H, **kw)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def bench(cell, shape, repeats, backend):
    T, B, I, H = shape
    ref, fused = _modules(cell, I, H)
    x = torch.randn(T, B, I)
    with fusedrnn.use_backend(backend):
        with torch.no_grad():
            err = (fused(x)[0] - ref(x)[0]).abs().max().item()
        if err > 1e-4:
            raise AssertionError(f"{cell} {shape}: fusedrnn differs from torch by {err}")
        xg = x.clone().requires_grad_()

        def fwd(m):
            with torch.no_grad():
                m(x)

        def fwdbwd(m):
            y = m(xg)[0]
            y.sum().backward()

        return {
            "fwd": _time_pair(lambda: fwd(fused), lambda: fwd(ref), repeats),
            "fwdbwd": _time_pair(lambda: fwdbwd(fused), lambda: fwdbwd(ref), repeats),
        }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="lstm,gru,rnn_tanh")
    p.add_argument("--shapes", nargs="*", default=None, help="T,B,I,H")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--isa", help="avx512, avx2, baseline (comma-separated) or all: fusedrnn and torch capped to "
                                 "each level in turn, a fresh process each")
    p.add_argument("--busy", type=int, default=0, help="processes spinning on a core each during the run")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else DEFAULT_SHAPES
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, backend {args.backend}, "
          f"fusedrnn cpu ISA {torch.ops.fusedrnn.cpu_isa()}, torch ATen ISA "
          f"{torch.backends.cpu.get_cpu_capability()}, busy processes {args.busy}, "
          f"load average {os.getloadavg()[0]:.1f}")
    with isa.busy_cores(args.busy) if args.busy else contextlib.nullcontext():
        table(args, shapes)


def table(args, shapes):
    print(f"{'cell':9} {'T,B,I,H':18} {'fwd ms':>9} {'torch':>9} {'x':>6} {'fwd+bwd ms':>11} {'torch':>9} {'x':>6}")
    for cell in args.cells.split(","):
        ratios = {"fwd": [], "fwdbwd": []}
        for shape in shapes:
            r = bench(cell, shape, args.repeats, args.backend)
            (f, t), (fb, tb) = r["fwd"], r["fwdbwd"]
            ratios["fwd"].append(t / f)
            ratios["fwdbwd"].append(tb / fb)
            print(f"{cell:9} {','.join(map(str, shape)):18} {f * 1e3:9.2f} {t * 1e3:9.2f} {t / f:6.2f} "
                  f"{fb * 1e3:11.2f} {tb * 1e3:9.2f} {tb / fb:6.2f}", flush=True)
        gm = {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in ratios.items()}
        print(f"{cell:9} {'geomean':18} {'':9} {'':9} {gm['fwd']:6.2f} {'':11} {'':9} {gm['fwdbwd']:6.2f}")


if __name__ == "__main__":
    main()
