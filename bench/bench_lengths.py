"""Variable lengths at padded speed? padded vs PackedSequence vs `lengths=`, torch.nn and fusedrnn (the
comparison lives in fusedrnn/bench/lengths.py; `python -m fusedrnn.bench --lengths` runs it too).

    python bench/bench_lengths.py [--threads 2] [--batch 16] [--hidden 128] [--seq-len 10,100,1000] [--json F]
"""
from __future__ import annotations

import argparse
import sys

import torch

from fusedrnn.bench import lengths


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
    p.add_argument("--device", default="cpu")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lengths.run(args.cells.split(","), args.modes.split(","), [int(t) for t in args.seq_len.split(",")],
                args.batch, args.hidden, args.repeats, args.max_seconds, device,
                torch.float16 if device.type == "cuda" else torch.float32, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
