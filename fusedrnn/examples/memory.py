"""Long-term dependencies: the adding problem over increasing sequence lengths, RNN-tanh vs LSTM vs GRU.

Each step carries (value ~ U(0, 1), marker); two steps are marked, one in each half of the sequence, and
the target is the sum of the two marked values. Read out from the last hidden state; trained with MSE and
gradient-norm clipping. "Accuracy" = fraction of held-out sequences with |prediction - target| < 0.04;
always answering 1.0 (the mean) gets ~0.078 of them (the chance line in the plot).

    python -m fusedrnn.examples.memory                                           # the real run
    python -m fusedrnn.examples.memory --lengths 5 10 --steps 60 --hidden 16     # tiny
    torchrun --nproc-per-node 2 -m fusedrnn.examples.memory   # data-parallel (DDP): each process takes half
                                                              # of every batch, same steps as one process
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import fusedrnn

from ._common import DEFAULT_OUT, out_dir, pyplot
from ._distributed import Ranks, run_on_ranks

TOL = 0.04
CHANCE = 2 * TOL - TOL ** 2  # P(|u1 + u2 - 1| < TOL) for u1, u2 ~ U(0, 1)
CHANCE_MSE = 1 / 6           # Var(u1 + u2): the MSE of always answering 1.0


def adding_batch(n: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.rand(n, length, generator=gen)
    half = max(1, length // 2)
    first = torch.randint(0, half, (n,), generator=gen)
    second = torch.randint(half, length, (n,), generator=gen) if length > 1 else first
    marks = torch.zeros(n, length)
    rows = torch.arange(n)
    marks[rows, first] = 1
    marks[rows, second] = 1
    target = (values * marks).sum(1)
    return torch.stack([values, marks], -1), target


class Adder(nn.Module):
    def __init__(self, cell: str, hidden: int, forget_bias: float = 0.0) -> None:
        super().__init__()
        if cell == "rnn_tanh":
            self.rnn = fusedrnn.RNN(2, hidden, batch_first=True, nonlinearity="tanh")
        else:
            self.rnn = getattr(fusedrnn, cell.upper())(2, hidden, batch_first=True)
        if cell == "lstm" and forget_bias:
            # gates i, f, g, o: start with the forget gate open (Jozefowicz et al., 2015), so the cell state
            # carries the first marked value across the sequence from the first step of training
            with torch.no_grad():
                self.rnn.bias_ih_l0[hidden:2 * hidden].fill_(forget_bias)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1]).squeeze(-1)


def run(cell: str, length: int, args, ranks: Ranks) -> tuple[float, float]:
    """-> (held-out accuracy, held-out MSE)."""
    dev = ranks.device
    torch.manual_seed(args.seed)
    model = Adder(cell, args.hidden, args.forget_bias).to(dev)
    trained = ranks.wrap(model)
    opt = torch.optim.Adam(trained.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + length)  # the same global batches on every rank
    bar = ranks.progress(args.steps, f"{cell:<8} T={length:<4}")
    loss_avg = None
    for step in range(1, args.steps + 1):
        x, y = ranks.shard(*adding_batch(args.batch, length, gen))
        loss = F.mse_loss(trained(x.to(dev)), y.to(dev))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)  # keeps RNN-tanh's exploding steps bounded
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        bar.update(step, mse=loss_avg)
    bar.close()
    x, y = adding_batch(args.test_size, length, torch.Generator().manual_seed(10_000 + length))
    with torch.no_grad():
        pred = model.eval()(x.to(dev)).cpu()
    return ((pred - y).abs() < TOL).float().mean().item(), F.mse_loss(pred, y).item()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[10, 25, 50, 100])
    ap.add_argument("--cells", nargs="+", default=["rnn_tanh", "lstm", "gru"],
                    choices=["rnn_tanh", "lstm", "gru"])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    ap.add_argument("--forget-bias", type=float, default=1.0, help="initial LSTM forget-gate bias (b_ih)")
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(DEFAULT_OUT, "memory"))
    args = ap.parse_args(argv)

    return run_on_ranks(_main, args)


def _main(args, ranks: Ranks) -> dict:
    dev = ranks.device
    out = out_dir(args.out)
    processes = f", {ranks.world_size} processes (DDP)" if ranks.distributed else ""
    ranks.print(f"memory: adding problem, lengths {args.lengths}, hidden {args.hidden}, {args.steps} steps, "
                f"clip {args.clip}, device {dev}{processes}; chance accuracy {CHANCE:.3f}")
    t0 = time.perf_counter()
    acc = {cell: [] for cell in args.cells}
    mse = {cell: [] for cell in args.cells}
    for length in args.lengths:
        for cell in args.cells:
            a, m = run(cell, length, args, ranks)
            acc[cell].append(a)
            mse[cell].append(m)
            ranks.print(f"T={length:<4} {cell:<8} accuracy {a:.3f}  MSE {m:.4f} (chance {CHANCE_MSE:.3f})  "
                        f"({time.perf_counter() - t0:.0f}s)")
    ranks.print("| T | " + " | ".join(args.cells) + " |")
    ranks.print("|---:|" + "---:|" * len(args.cells))
    for i, length in enumerate(args.lengths):
        ranks.print(f"| {length} | " + " | ".join(f"{acc[c][i]:.3f}" for c in args.cells) + " |")

    results = {"accuracy": acc, "mse": mse, "lengths": args.lengths, "chance": CHANCE, "chance_mse": CHANCE_MSE,
               "files": []}
    if not ranks.is_main:
        return results
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for cell in args.cells:
        ax.plot(args.lengths, acc[cell], "o-", label=cell)
    ax.axhline(CHANCE, color="grey", ls="--", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel(f"accuracy (|error| < {TOL})")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="center right")  # the lower left holds RNN-tanh's curve, the top the gated cells
    fig.tight_layout()
    path = os.path.join(out, "memory.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved {path}")
    results["files"].append(path)
    return results


if __name__ == "__main__":
    main()
