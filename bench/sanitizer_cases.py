"""Runs every fusedrnn GPU kernel path once at a tiny shape: the program compute-sanitizer watches.

    python bench/sanitizer_cases.py --list                 # what exists and what would run
    python bench/sanitizer_cases.py                        # run them (exit 1 if a case fails or mismatches)
    python bench/sanitizer_cases.py --coverage k.json      # also record the CUDA kernels each case launched
    compute-sanitizer --tool memcheck python bench/sanitizer_cases.py --quiet

Nothing is hard-coded about which kernels exist. The cases are found at run time:
  * every fusedrnn backend available on the device except "reference" (plain PyTorch) -- today "cuda"
    and "triton" once they land -- is forced (fusedrnn.use_backend + $FUSEDRNN_BACKEND) on each cell and
    on variants chosen to reach the different paths a backend may take: odd sizes, T=1/B=1, fp32/fp16/bf16,
    reverse, per-sequence lengths (with a zero length), LSTM projection, no bias, a larger H, and the
    inference (no workspace) and training (workspace + BPTT backward) forwards; then one module case per
    cell (2 layers, bidirectional, batch_first, PackedSequence). A variant a backend refuses is listed as
    SKIP with the backend's reason.
  * any module of fusedrnn, fusedrnn.backends or fusedrnn.triton that defines
    `sanitizer_cases(device) -> list[(name, callable)]` adds its own cases (the hook for kernels that are
    not layer backends, e.g. a beam-search top-k).
  * the fusedrnn ops registered with a CUDA kernel are listed, so an op that no case reached stands out.

Each layer case is compared with the fp64 reference with deliberately loose bounds (MISMATCH): under a
sanitizer this catches garbage from uninitialised or out-of-bounds memory; precision is the tests' job.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import fusedrnn  # noqa: E402
from fusedrnn import BackendUnsupportedError, functional, reference  # noqa: E402
from fusedrnn.bench.providers import forced_backend  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Loose bounds on max |error| / max(1, |ref|): garbage detectors, not precision tests (see module doc).
GARBAGE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2e-1}

# name -> layer arguments. Sizes are odd on purpose (no multiple of a tile hides an edge).
VARIANTS = {
    "base":      dict(T=5, B=3, I=7, H=16),
    "fp16":      dict(T=5, B=3, I=7, H=16, dtype="float16"),
    "bf16":      dict(T=5, B=3, I=7, H=16, dtype="bfloat16"),
    "T1-B1":     dict(T=1, B=1, I=3, H=5),
    "odd-H":     dict(T=4, B=5, I=9, H=33),
    "reverse":   dict(T=5, B=3, I=7, H=16, reverse=True),
    "lengths":   dict(T=6, B=4, I=7, H=16, lengths=[6, 3, 0, 1]),
    "rev-len":   dict(T=6, B=4, I=7, H=16, lengths=[2, 6, 1, 0], reverse=True),
    "no-bias":   dict(T=5, B=3, I=7, H=16, bias=False),
    "proj":      dict(T=5, B=3, I=7, H=16, proj=8),
    "H128-fp16": dict(T=3, B=8, I=32, H=128, dtype="float16"),
    "H256-B33":  dict(T=3, B=33, I=16, H=256),
}


def layer_args(cell, T, B, I, H, dtype="float32", reverse=False, lengths=None, bias=True, proj=0,
               device="cuda", seed=0):
    if proj and cell != "lstm":
        return None
    g = torch.Generator().manual_seed(seed)
    G = reference.GATES[cell]
    H_out = proj or H
    k = 1 / H ** 0.5
    dt = DTYPES[dtype]
    uni = lambda *s: ((torch.rand(*s, generator=g) * 2 - 1) * k).to(device=device, dtype=dt)  # noqa: E731
    nrm = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dt)  # noqa: E731
    args = dict(x=nrm(T, B, I), h0=nrm(B, H_out) * 0.5, c0=nrm(B, H) * 0.5 if cell == "lstm" else None,
                w_ih=uni(G * H, I), w_hh=uni(G * H, H_out), b_ih=uni(G * H) if bias else None,
                b_hh=uni(G * H) if bias else None, w_hr=uni(H_out, H) if proj else None, reverse=reverse,
                lengths=None if lengths is None else torch.tensor(lengths, device=device))
    return args


def _tensors(args):
    return {n: t for n, t in args.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}


def _loss(outs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs if o is not None)


def _layer_run(cell, args):
    """Inference forward, training forward + backward. Returns the outputs and gradients, by name."""
    with torch.no_grad():
        functional.rnn_layer(cell, **args)
    leaves = _tensors(args)
    for t in leaves.values():
        t.requires_grad_(True)
    y, h, c = functional.rnn_layer(cell, **args)
    grads = torch.autograd.grad(_loss([y, h, c]), list(leaves.values()))
    res = {"y": y, "h_n": h, "c_n": c}
    res.update({f"grad_{n}": gr for n, gr in zip(leaves, grads)})
    return res


def _mismatch(cell, args, got) -> tuple[float, float]:
    """(worst error / max(1, |ref|) over outputs and gradients, its bound)."""
    ref_args = {n: (t.detach().double().requires_grad_(True) if isinstance(t, torch.Tensor)
                    and t.is_floating_point() else t) for n, t in args.items()}
    y, h, c = reference.rnn_layer(cell, **ref_args)
    leaves = _tensors(ref_args)
    grads = torch.autograd.grad(_loss([y, h, c]), list(leaves.values()))
    ref = {"y": y, "h_n": h, "c_n": c}
    ref.update({f"grad_{n}": gr for n, gr in zip(leaves, grads)})
    worst = 0.0
    for name, r in ref.items():
        if r is None:
            continue
        diff = (got[name].detach().double() - r.detach()).abs()
        err = float("inf") if not torch.isfinite(diff).all() else (diff.max().item() if diff.numel() else 0.0)
        worst = max(worst, err / max(1.0, r.abs().max().item() if r.numel() else 1.0))
    return worst, GARBAGE[args["x"].dtype]


def _module_case(cell, device):
    from torch.nn.utils.rnn import pack_padded_sequence
    kw = dict(num_layers=2, bidirectional=True, batch_first=True, device=device)
    m = {"lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU}.get(cell)
    m = m(6, 12, **kw) if m else fusedrnn.RNN(6, 12, nonlinearity=cell[4:], **kw)
    x = torch.randn(4, 5, 6, device=device, requires_grad=True)

    def run():
        packed = pack_padded_sequence(x, torch.tensor([5, 3, 2, 1]), batch_first=True)
        out, _ = m(packed)
        out.data.sum().backward()
        y, _ = m(x)
        y.sum().backward()
    return run


def discovered_cases(device):
    """(name, callable) pairs from fusedrnn modules defining sanitizer_cases(device)."""
    names = set()
    for pkg in ("fusedrnn", "fusedrnn.backends", "fusedrnn.triton"):
        try:
            mod = importlib.import_module(pkg)
        except Exception:
            continue
        names.add(pkg)
        for info in pkgutil.iter_modules(getattr(mod, "__path__", [])):
            names.add(f"{pkg}.{info.name}")
    names |= {n for n in sys.modules if n == "fusedrnn" or n.startswith("fusedrnn.")}
    cases = []
    for name in sorted(names):
        if name.startswith("fusedrnn.bench") or name.endswith("__main__"):
            continue
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # a kernel module that does not import here: say so, don't hide it
            cases.append((f"{name}: import", _raiser(e)))
            continue
        hook = getattr(mod, "sanitizer_cases", None)
        if callable(hook):
            cases += [(f"{name}: {n}", fn) for n, fn in hook(device)]
    return cases


def _raiser(e):
    def fn():
        raise e
    return fn


def registered_ops():
    """fusedrnn ops with the dispatch keys that have a kernel (CUDA ones are what a sanitizer should see)."""
    ops = {}
    for name in sorted(torch._C._dispatch_get_all_op_names()):
        if name.startswith("fusedrnn::"):
            ops[name] = [k for k in ("CUDA", "CPU", "CompositeExplicitAutograd", "CompositeImplicitAutograd")
                         if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
    return ops


def kernel_backends(device, only=None):
    """(backends to check, {backend: why it is not checked})."""
    skipped = {}
    chosen = []
    for name in fusedrnn.BACKEND_NAMES:
        if only and name not in only:
            continue
        if name == "reference":
            skipped[name] = "plain PyTorch, no kernel of its own"
            continue
        why = fusedrnn.backends.BACKENDS[name].unavailable_reason(torch.device(device))
        if why:
            skipped[name] = why
        else:
            chosen.append(name)
    return chosen, skipped


def plan(device, backends, cells, variants):
    cases = []
    for b in backends:
        for cell in cells:
            for v in variants:
                cases.append((f"{b} {cell} {v}", "layer", (b, cell, v)))
            cases.append((f"{b} {cell} module-2L-bi-packed", "module", (b, cell)))
    cases += [(name, "hook", fn) for name, fn in discovered_cases(device)]
    return cases


class _Kernels:
    """Records the CUDA kernels launched inside the block (torch.profiler), when asked to."""

    def __init__(self, enabled):
        self.enabled, self.names = enabled, []

    def __enter__(self):
        if self.enabled:
            from torch.profiler import ProfilerActivity, profile
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.prof.__exit__(*exc)
            if exc[0] is None:  # CUDA kernels, and the fusedrnn ops that ran (the CPU ones on a CPU)
                names = {e.name for e in self.prof.events()
                         if str(getattr(e, "device_type", "")).split(".")[-1].lower() == "cuda"
                         or e.name.startswith("fusedrnn::")}
                self.names = sorted(names)
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", action="append", help="only these backends (default: every available one)")
    p.add_argument("--cell", action="append", help="only these cells (default: all)")
    p.add_argument("--variant", action="append", help=f"only these variants ({', '.join(VARIANTS)})")
    p.add_argument("--list", action="store_true", help="print what exists and the cases; run nothing")
    p.add_argument("--coverage", metavar="JSON",
                   help="record the CUDA kernels and fusedrnn ops each case runs (torch.profiler)")
    p.add_argument("--json", metavar="FILE", help="write every case's result here")
    p.add_argument("--quiet", action="store_true", help="only failures and the summary")
    args = p.parse_args(argv)
    split = lambda v: [s for x in (v or []) for s in x.split(",") if s]  # noqa: E731
    cells = split(args.cell) or list(reference.CELLS)
    variants = split(args.variant) or list(VARIANTS)
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variant: unknown {v!r}; expected one of {', '.join(VARIANTS)}")
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"sanitizer_cases: no CUDA device here (torch {torch.__version__}); nothing to run")
        return 2

    backends, skipped = kernel_backends(device, split(args.backend))
    ops = registered_ops()
    ext = "loaded" if fusedrnn.has_extension() else "absent"
    print(f"fusedrnn {fusedrnn.__version__} on {device}: extension {ext}")
    print(f"kernel backends checked: {', '.join(backends) or 'none'}")
    for b, why in skipped.items():
        print(f"  not checked: {b}: {why}")
    print("fusedrnn ops registered (dispatch keys with a kernel):")
    for name, keys in ops.items():
        print(f"  {name}: {', '.join(keys) or '-'}")
    cases = plan(device, backends, cells, variants)
    if args.list:
        for name, kind, _ in cases:
            print(f"  case {name} ({kind})")
        print(f"{len(cases)} cases")
        return 0
    if not cases:
        print("NOTHING TO CHECK: no fusedrnn GPU kernel path is available on this device")
        return 0

    results, kernels = [], {}
    for name, kind, payload in cases:
        t0 = time.perf_counter()
        status, detail = "OK", ""
        try:
            with _Kernels(bool(args.coverage)) as rec:
                if kind == "layer":
                    b, cell, v = payload
                    la = layer_args(cell, device=device, **VARIANTS[v])
                    if la is None:
                        status, detail = "SKIP", "variant does not apply to this cell"
                    else:
                        with forced_backend(b):
                            got = _layer_run(cell, la)
                        if device.startswith("cuda"):
                            torch.cuda.synchronize()
                        err, bound = _mismatch(cell, la, got)
                        detail = f"max error {err:.2g} (garbage bound {bound:g})"
                        if not err <= bound:
                            status = "MISMATCH"
                elif kind == "module":
                    b, cell = payload
                    with forced_backend(b):
                        _module_case(cell, device)()
                else:
                    payload()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
            kernels[name] = rec.names
        except BackendUnsupportedError as e:
            status, detail = "SKIP", str(e).split(". Use fusedrnn.use_backend")[0][-240:]
        except Exception as e:
            status, detail = "FAIL", f"{type(e).__name__}: {e}"[:500]
            if not args.quiet:
                traceback.print_exc()
        results.append({"case": name, "status": status, "detail": detail,
                        "seconds": round(time.perf_counter() - t0, 3)})
        if not args.quiet or status in ("FAIL", "MISMATCH"):
            print(f"{status:8} {name}  {detail}", flush=True)

    counts = {s: sum(r["status"] == s for r in results) for s in ("OK", "SKIP", "MISMATCH", "FAIL")}
    print("summary: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if args.coverage:
        launched = sorted({k for ks in kernels.values() for k in ks})
        with open(args.coverage, "w") as f:
            json.dump({"backends": backends, "not_checked": skipped, "ops": ops, "kernels_per_case": kernels,
                       "kernels": launched}, f, indent=1)
        print(f"{len(launched)} distinct CUDA kernels and fusedrnn ops ran; per case in {args.coverage}")
        key = "CUDA" if device.startswith("cuda") else "CPU"
        for op, keys in ops.items():
            if key in keys and op not in launched:
                print(f"NOT REACHED: {op} has a {key} kernel but no case ran it")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backends": backends, "not_checked": skipped, "results": results}, f, indent=1)
    return 1 if counts["FAIL"] or counts["MISMATCH"] else 0


if __name__ == "__main__":
    sys.exit(main())
