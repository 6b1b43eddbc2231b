"""LayerNorm LSTM / GRU and zoneout: fusedrnn against what a PyTorch user writes without it.

torch.nn has no LayerNorm LSTM or zoneout, so the baseline is the usual replacement: a Python time loop of
torch ops (F.linear + F.layer_norm + the gates, as in many model zoos), same math and same weights. Also
timed: torch.nn's plain LSTM / GRU (no norm, no zoneout: the cost floor of the recurrence in torch's kernel)
and fusedrnn on backend "reference" (its driver with the row math in PyTorch ops: what the fused row
kernels save). Each case is checked for equal outputs first; calls are interleaved; medians in ms.

    python bench/bench_ext.py [--threads 2] [--shapes 50x16x256,50x64x256,25x16x1024] [--json F]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import fusedrnn
from fusedrnn.bench.timing import median_ms
from fusedrnn.reference import LN_EPS


def torch_layernorm_rnn(module, x, zoneout_h=None, zoneout_c=None):
    """A LayerNorm LSTM / GRU layer as a Python loop of torch ops (the baseline), module's weights."""
    w_ih, w_hh, b_ih, b_hh = module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0
    T, B, _ = x.shape
    H = module.hidden_size
    G = 4 if module.cell == "lstm" else 3
    ln = module.layer_norm
    a_x_all = F.linear(x, w_ih)
    if ln:
        a_x_all = F.layer_norm(a_x_all, (G * H,), module.ln_ih_weight_l0, None, LN_EPS)
    a_x_all = a_x_all + b_ih
    h = x.new_zeros(B, H)
    c = x.new_zeros(B, H)
    ys = []
    for t in range(T):
        a_h = F.linear(h, w_hh)
        if ln:
            a_h = F.layer_norm(a_h, (G * H,), module.ln_hh_weight_l0, None, LN_EPS)
        a_h = a_h + b_hh
        if module.cell == "lstm":
            i, f, g, o = (a_x_all[t] + a_h).chunk(4, -1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            c_out = F.layer_norm(c_new, (H,), module.ln_c_weight_l0, module.ln_c_bias_l0, LN_EPS) if ln else c_new
            h_new = torch.sigmoid(o) * torch.tanh(c_out)
            if zoneout_c is not None:
                c_new = torch.where(zoneout_c[t] != 0, c, c_new)
            c = c_new
        else:
            x_r, x_z, x_n = a_x_all[t].chunk(3, -1)
            h_r, h_z, h_n = a_h.chunk(3, -1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            h_new = (1 - z) * n + z * h
        if zoneout_h is not None:
            h_new = torch.where(zoneout_h[t] != 0, h, h_new)
        h = h_new
        ys.append(h)
    return torch.stack(ys)


def run_case(kind: str, T: int, B: int, H: int, mode: str, min_repeats: int, max_seconds: float) -> dict:
    cell = "lstm" if "lstm" in kind else "gru"
    torch.manual_seed(0)
    x = torch.randn(T, B, H)
    if kind.startswith("ln"):
        ours = (fusedrnn.LayerNormLSTM if cell == "lstm" else fusedrnn.LayerNormGRU)(H, H)
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if name.startswith("ln_"):
                    p.add_(0.1 * torch.randn_like(p))
        masks = (None, None)
    else:  # zoneout, training: both sides use the same masks (fusedrnn's drawn from the same seed)
        ours = (fusedrnn.LSTM if cell == "lstm" else fusedrnn.GRU)(H, H, zoneout=0.1)
        p = 0.1
        masks = (torch.empty(T, B, H).bernoulli_(p), torch.empty(T, B, H).bernoulli_(p) if cell == "lstm" else None)
        ours._zoneout_masks = lambda x, hidden: masks  # the same masks as the baseline
    plain = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(H, H)
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("ln_")})
    if mode == "fwdbwd":
        x.requires_grad_(True)
    with torch.no_grad():  # same function first
        want = torch_layernorm_rnn(ours, x, *masks)
        got = ours(x)[0]
        err = (got - want).abs().max().item()
    if err > 1e-4:
        raise SystemExit(f"{kind} T={T} B={B} H={H}: fusedrnn differs from the torch loop by {err:.3g}")

    def on(backend):
        def run():
            with fusedrnn.use_backend(backend):
                return ours(x)[0]
        return run
    fns = {"torch loop": lambda: torch_layernorm_rnn(ours, x, *masks), "fusedrnn": lambda: ours(x)[0],
           "fusedrnn reference rows": on("reference"), "torch.nn plain": lambda: plain(x)[0]}
    times = median_ms(fns, mode, min_repeats, max_seconds)
    backend = fusedrnn.explain(ours, x).backends[0]
    return {"kind": kind, "T": T, "B": B, "H": H, "mode": mode, "backend": backend, "max_abs_diff": err,
            "ms": times, "speedup_vs_torch_loop": times["torch loop"] / times["fusedrnn"],
            "vs_plain_torch_nn": times["torch.nn plain"] / times["fusedrnn"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="50x16x256,50x64x256,25x16x1024", help="TxBxH,...")
    ap.add_argument("--kinds", default="ln_lstm,ln_gru,zoneout_lstm,zoneout_gru")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--min-repeats", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=4.0)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(f"torch {torch.__version__}, {args.threads} threads; ms per call (median), speed = torch loop / fusedrnn")
    print(f"{'case':<34}{'mode':<8}{'backend':<10}{'torch loop':>11}{'fusedrnn':>10}{'ref rows':>10}"
          f"{'nn plain':>10}{'speed':>8}")
    for kind in args.kinds.split(","):
        for shape in args.shapes.split(","):
            T, B, H = (int(v) for v in shape.split("x"))
            for mode in args.modes.split(","):
                r = run_case(kind, T, B, H, mode, args.min_repeats, args.max_seconds)
                rows.append(r)
                ms = r["ms"]
                print(f"{kind + f' T={T} B={B} H={H}':<34}{mode:<8}{r['backend']:<10}{ms['torch loop']:>11.2f}"
                      f"{ms['fusedrnn']:>10.2f}{ms['fusedrnn reference rows']:>10.2f}{ms['torch.nn plain']:>10.2f}"
                      f"{r['speedup_vs_torch_loop']:>7.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
