"""Variable lengths at padded speed? One batch of mixed lengths, run padded, packed and with `lengths=`.

pytorch #149194: torch.nn's PackedSequence path is 5x (T=10) to 114x (T=4000) slower than the same batch
padded. For each (cell, T) this times, with the same weights and the same batch (lengths drawn uniformly in
[T/4, T], the longest = T), interleaved call by call:
    torch.nn padded          the whole padded batch (wrong past each end, the baseline of speed)
    torch.nn packed          pack_padded_sequence(enforce_sorted=False) -> module -> pad_packed_sequence
    fusedrnn padded          the whole padded batch (auto)
    fusedrnn lengths=        module(padded, lengths=lengths)      (auto: a fused backend, see README)
    fusedrnn packed          module(PackedSequence)               (auto), with the caller's pack / pad
    fusedrnn packed module   the module call alone on a PackedSequence built once
and prints each time and the ratios packed/padded, lengths/padded. fwd (no_grad) and fwd+bwd.

    python bench/bench_lengths.py [--threads 2] [--batch 16] [--hidden 128] [--seq-len 10,100,1000] [--json F]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedrnn
from fusedrnn.bench.timing import median_ms


def run_case(cell: str, T: int, B: int, H: int, mode: str, repeats: int, max_seconds: float) -> dict:
    torch.manual_seed(0)
    cls = {"lstm": "LSTM", "gru": "GRU"}[cell]
    ref = getattr(torch.nn, cls)(H, H)
    ours = getattr(fusedrnn, cls)(H, H)
    ours.load_state_dict(ref.state_dict())
    if mode == "fwdbwd":
        for m in (ref, ours):
            m.requires_grad_(True)
    x = torch.randn(T, B, H)
    lengths = torch.randint(max(1, T // 4), T + 1, (B,))
    lengths[0] = T
    packed = lambda: pack_padded_sequence(x, lengths, enforce_sorted=False)  # noqa: E731
    fns = {
        "torch padded": lambda: ref(x)[0],
        "torch packed": lambda: pad_packed_sequence(ref(packed())[0], total_length=T)[0],
        "fusedrnn padded": lambda: ours(x)[0],
        "fusedrnn lengths=": lambda: ours(x, lengths=lengths)[0],
        "fusedrnn packed": lambda: pad_packed_sequence(ours(packed())[0], total_length=T)[0],
        # the module call alone, on a PackedSequence built once (as a data loader hands it over)
        "fusedrnn packed module": lambda: ours(prebuilt)[0].data,
    }
    prebuilt = packed()
    # same answers where defined: packed torch == fusedrnn lengths= == fusedrnn packed
    with torch.no_grad():
        want = fns["torch packed"]()
        for name in ("fusedrnn lengths=", "fusedrnn packed"):
            err = (fns[name]() - want).abs().max().item()
            if err > 1e-4:
                raise SystemExit(f"{name} disagrees with torch.nn packed at {cell} T={T}: max error {err}")
    ms = median_ms(fns, mode, repeats, max_seconds)
    return {"cell": cell, "T": T, "B": B, "H": H, "mode": mode, "ms": {k: round(v, 4) for k, v in ms.items()},
            "backend_lengths": fusedrnn.explain(ours, x, lengths=lengths).backends[0],
            "backend_padded": fusedrnn.explain(ours, x).backends[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seq-len", default="10,100,1000")
    p.add_argument("--cells", default="lstm,gru")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=5.0, help="per case, after 3 rounds")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'case':26s} {'torch pad':>9s} {'torch pack':>10s} {'pack/pad':>8s} | {'fused pad':>9s} "
          f"{'lengths=':>9s} {'len/pad':>7s} {'packed':>9s} {'pack/pad':>8s} {'module':>8s} {'mod/pad':>7s}"
          "  (ms; backend lengths/padded)")
    for cell in args.cells.split(","):
        for mode in args.modes.split(","):
            for T in (int(t) for t in args.seq_len.split(",")):
                r = run_case(cell, T, args.batch, args.hidden, mode, args.repeats, args.max_seconds)
                rows.append(r)
                m = r["ms"]
                print(f"{cell}-{mode}-T{T}-B{args.batch}-H{args.hidden}".ljust(26) +
                      f" {m['torch padded']:9.2f} {m['torch packed']:10.2f} {m['torch packed'] / m['torch padded']:8.2f}"
                      f" | {m['fusedrnn padded']:9.2f} {m['fusedrnn lengths=']:9.2f} "
                      f"{m['fusedrnn lengths='] / m['fusedrnn padded']:7.2f} {m['fusedrnn packed']:9.2f} "
                      f"{m['fusedrnn packed'] / m['fusedrnn padded']:8.2f} {m['fusedrnn packed module']:8.2f} "
                      f"{m['fusedrnn packed module'] / m['fusedrnn padded']:7.2f}  "
                      f"({r['backend_lengths']}/{r['backend_padded']})",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
