"""GPU benchmark of the Triton backend's paths against cuDNN (torch.nn), in one run.

    python bench/bench_triton.py [--cells lstm,gru] [--dtypes float16,bfloat16] [--modes fwd,fwdbwd]
                                 [--paths auto,persistent,barrier,alternating] [--shape T,B,I,H ...]
                                 [--repeats 20] [--warmup 3] [--csv FILE] [--list]

Per case (cell, T, B, I, H, dtype, mode) and provider (cudnn, triton:<path>): a path the backend refuses
for the case is listed with the reason and not timed; the others are first checked against a float64 run
of torch.nn on the same weights (within 2x cuDNN's own error + a few ulp, the rule of tests/helpers.py) --
a WRONG provider is not timed -- then timed with CUDA events (median of --repeats after --warmup; fwd under
no_grad, fwdbwd = forward + backward of y). The first call of a Triton path autotunes and compiles; the
warmup absorbs it. Needs a CUDA device; --list and --help work anywhere.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import statistics
import sys

import torch

import fusedrnn
from fusedrnn.backends import BACKENDS, LayerCall, scoped_environ
from fusedrnn.backends.triton import PATHS, use_path
from fusedrnn.bench.timing import measure

# DeepBench-like shapes (T, B, I, H) around the persistent / barrier / alternating boundaries.
DEFAULT_SHAPES = [(256, 16, 128, 128), (256, 64, 256, 256), (100, 16, 512, 512), (100, 32, 1024, 1024),
                  (25, 4, 256, 256), (150, 16, 256, 256)]
TORCH = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN, "rnn_relu": torch.nn.RNN}
FUSED = {"lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU, "rnn_tanh": fusedrnn.RNN, "rnn_relu": fusedrnn.RNN}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23}


def _shape(text: str):
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected T,B,I,H (positive integers), got {text!r}")
    return tuple(int(p) for p in parts)


def _list(kind, choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{kind}: expected a comma list of {list(choices)}, got {text!r}")
        return items
    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=_list("cells", TORCH), default=["lstm", "gru"])
    ap.add_argument("--dtypes", type=_list("dtypes", DTYPES), default=["float16"])
    ap.add_argument("--modes", type=_list("modes", ("fwd", "fwdbwd")), default=["fwd", "fwdbwd"])
    ap.add_argument("--paths", type=_list("paths", PATHS), default=list(PATHS))
    ap.add_argument("--shape", type=_shape, action="append", help="T,B,I,H (repeatable)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--csv", help="write the rows here")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    args.shapes = args.shape or DEFAULT_SHAPES
    return args


def cases(args):
    for cell in args.cells:
        for dtype in args.dtypes:
            for shape in args.shapes:
                for mode in args.modes:
                    yield cell, shape, dtype, mode


def _modules(cell, I, H, dtype):
    kw = {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}
    ref = TORCH[cell](I, H, device="cuda", dtype=dtype, **kw)
    ours = FUSED[cell](I, H, device="cuda", dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _time(fn, repeats, warmup):
    """Median milliseconds of fn() over `repeats` calls, CUDA events around each (the CLI's timer)."""
    times = measure({"fn": (fn, contextlib.nullcontext)}, torch.device("cuda"), warmup, repeats)["fn"]
    return statistics.median(times)


@contextlib.contextmanager
def _forced(path):
    """Backend "triton" on `path`, also for autograd's CUDA thread (it does not see context variables)."""
    with scoped_environ({"FUSEDRNN_BACKEND": "triton", "FUSEDRNN_TRITON_PATH": path}), \
            fusedrnn.use_backend("triton"), use_path(path):
        yield


def run_case(cell, shape, dtype_name, mode, paths, repeats, warmup):
    T, B, I, H = shape
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    ref, ours = _modules(cell, I, H, dtype)
    x = torch.randn(T, B, I, device="cuda", dtype=dtype)
    y64 = TORCH[cell](I, H, device="cuda", dtype=torch.float64,
                      **({"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}))
    y64.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    with torch.no_grad():
        exact = y64(x.double())[0]
        y_cudnn = ref(x)[0]
    tol = 2 * (y_cudnn.double() - exact).abs().max().item() + 4 * ULP[dtype] * max(1.0, exact.abs().max().item())

    def step(module):
        if mode == "fwd":
            with torch.no_grad():
                module(x)
        else:
            xg = x.detach().requires_grad_()
            module(xg)[0].float().sum().backward()

    rows = [dict(provider="cudnn", status="ok", ms=_time(lambda: step(ref), repeats, warmup))]
    call = LayerCall(cell, x, x.new_empty(B, H), x.new_empty(B, H) if cell == "lstm" else None,
                     ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0, ref.bias_hh_l0, None, None, False)
    for path in paths:
        with use_path(path):
            why = BACKENDS["triton"].unsupported_reason(call)
        name = f"triton:{path}"
        if why is not None:
            rows.append(dict(provider=name, status=f"refused: {why}"))
            continue
        with _forced(path):
            with torch.no_grad():
                err = (ours(x)[0].double() - exact).abs().max().item()
            if err > tol:
                rows.append(dict(provider=name, status=f"WRONG: max error {err:.3g} > {tol:.3g}"))
                continue
            rows.append(dict(provider=name, status="ok", ms=_time(lambda: step(ours), repeats, warmup)))
    base = rows[0]["ms"]
    for r in rows:
        r.update(cell=cell, T=T, B=B, I=I, H=H, dtype=dtype_name, mode=mode)
        if "ms" in r:
            r["us_per_step"] = 1000 * r["ms"] / T
            r["speedup_vs_cudnn"] = base / r["ms"]
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for cell, shape, dtype, mode in cases(args):
            print(f"{cell} T{shape[0]} B{shape[1]} I{shape[2]} H{shape[3]} {dtype} {mode}: cudnn, "
                  + ", ".join(f"triton:{p}" for p in args.paths))
        return 0
    if not torch.cuda.is_available():
        print("bench_triton.py needs a CUDA device (--list shows the cases)", file=sys.stderr)
        return 2
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}")
    all_rows = []
    for cell, shape, dtype, mode in cases(args):
        rows = run_case(cell, shape, dtype, mode, args.paths, args.repeats, args.warmup)
        all_rows += rows
        for r in rows:
            timing = (f"{r['ms']:9.3f} ms {r['us_per_step']:8.2f} us/step x{r['speedup_vs_cudnn']:.2f}"
                      if "ms" in r else "")
            print(f"{cell:8s} T{shape[0]:<4d} B{shape[1]:<4d} I{shape[2]:<5d} H{shape[3]:<5d} {dtype:8s} {mode:6s} "
                  f"{r['provider']:20s} {timing} {r['status'] if r['status'] != 'ok' else ''}", flush=True)
    if args.csv:
        keys = ["cell", "T", "B", "I", "H", "dtype", "mode", "provider", "status", "ms", "us_per_step",
                "speedup_vs_cudnn"]
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in all_rows:
                w.writerow({k: r.get(k, "") for k in keys})
    return 3 if any(r["status"].startswith("WRONG") for r in all_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
