"""fusedrnn.ops.beam_topk against the torch expression it replaces, on the CPU and (when there is one) the GPU.

    python bench/bench_beam_topk.py [--repeats 7] [--beams 4,8,16] [--vocabs 32000,128000] [--batch 32]
                                    [--dtypes fp32] [--devices cpu,cuda]

torch expression: (log_softmax(logits.float(), -1) + beam_scores[:, None]).view(B, K*V).topk(2K), which writes
and reads a [B*K, V] fp32 log-prob tensor; fusedrnn reads the logits once. k = 2K (beam search's candidates).
Providers per device: CPU -- fusedrnn "cpu" (C++), GPU -- fusedrnn "cuda" and "triton" (those available).
Before timing, each provider's tokens and parents must equal the torch expression's (random fp32 logits
have no ties; for fp16/bf16, which tie, fusedrnn's reference with its tie rule) and its scores agree
within 1e-4; then the providers take turns call by call (load on a
shared machine hits all alike). Prints median ms (p20-p80) and torch/fusedrnn (> 1: fusedrnn faster).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import torch

import fusedrnn
from fusedrnn import ops
from fusedrnn.reference_decoding import beam_topk_reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_expression(logits, beam_scores, k, K):
    B = logits.shape[0] // K
    V = logits.shape[1]
    top = (torch.log_softmax(logits.float(), -1) + beam_scores[:, None]).view(B, K * V).topk(k)
    return top.values, top.indices % V, top.indices // V


def fused(backend):
    def run(logits, beam_scores, k, K):
        with fusedrnn.use_backend(backend):
            return ops.beam_topk(logits, beam_scores, k, K)
    return run


def providers(device):
    if device.type == "cpu":
        names = ["cpu"]
    else:
        names = ["cuda", "triton"]
    probe = torch.zeros(2, 8, device=device)
    out = {}
    for name in names:
        why = ops.beam_topk_refusal(name, probe, 8)
        if why is None:
            out[f"fusedrnn:{name}"] = fused(name)
        else:
            print(f"  (fusedrnn:{name} unavailable on {device.type}: {why})")
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_turns(fns, device, repeats, warmup=2):
    """{name: [seconds]}; the providers alternate call by call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def quantiles(ts):
    ts = sorted(ts)
    q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
    return statistics.median(ts) * 1e3, q(0.2) * 1e3, q(0.8) * 1e3


def check(name, got, expect):
    (s, t, p), (es, et, ep) = got, expect
    if not (torch.equal(t.cpu(), et.cpu()) and torch.equal(p.cpu(), ep.cpu())):
        raise AssertionError(f"{name}: tokens/parents differ from the torch expression")
    err = (s.float().cpu() - es.float().cpu()).abs().max().item()
    if err > 1e-4:
        raise AssertionError(f"{name}: scores differ from the torch expression by {err}")


def meta(device):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"device {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, commit {commit}, "
            f"load {load:.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--beams", default="4,8,16")
    p.add_argument("--vocabs", default="32000,128000")
    p.add_argument("--dtypes", default=None, help="default: fp32 on the CPU, fp32,fp16 on a GPU")
    p.add_argument("--devices", default=None, help="default: cpu, and cuda when available")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    beams = [int(v) for v in args.beams.split(",")]
    vocabs = [int(v) for v in args.vocabs.split(",")]
    B = args.batch
    for dev_name in devices:
        device = torch.device(dev_name)
        dtypes = args.dtypes.split(",") if args.dtypes else (["fp32"] if device.type == "cpu" else ["fp32", "fp16"])
        print(meta(device))
        fns_by_name = providers(device)
        names = list(fns_by_name)
        header = f"{'B':>3} {'K':>3} {'V':>7} {'k':>3} {'dtype':5} {'torch ms':>16}"
        for n in names:
            header += f" {n + ' ms':>22} {'x':>5}"
        print(header)
        for dtype in dtypes:
            for V in vocabs:
                for K in beams:
                    k = 2 * K
                    g = torch.Generator().manual_seed(V + K)
                    logits = (torch.randn(B * K, V, generator=g) * 3).to(DTYPES[dtype]).to(device)
                    beam_scores = (-torch.rand(B * K, generator=g) * 10).to(device)
                    if dtype == "fp32":
                        expect = torch_expression(logits, beam_scores, k, K)
                    else:  # ties: torch.topk's order among them is unspecified
                        expect = beam_topk_reference(logits, beam_scores, k, K)
                    fns = {"torch": lambda: torch_expression(logits, beam_scores, k, K)}
                    for n, f in fns_by_name.items():
                        check(n, f(logits, beam_scores, k, K), expect)
                        fns[n] = (lambda f=f: f(logits, beam_scores, k, K))
                    times = time_turns(fns, device, args.repeats)
                    tm, t20, t80 = quantiles(times["torch"])
                    row = f"{B:>3} {K:>3} {V:>7} {k:>3} {dtype:5} {tm:7.2f} ({t20:.1f}-{t80:.1f})"
                    for n in names:
                        m, q20, q80 = quantiles(times[n])
                        row += f" {m:9.2f} ({q20:.1f}-{q80:.1f}) {tm / m:5.2f}"
                    print(row, flush=True)
                    del logits, expect
        print()


if __name__ == "__main__":
    main()
