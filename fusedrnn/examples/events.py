"""Polyphonic sound-event tagging on synthetic spectrograms: frame-level MLP vs stacked LSTM vs stacked
bidirectional LSTM (merge_mode="sum").

Each clip is a [T, F] "spectrogram": up to --max-events overlapping events from 10 classes plus noise. Classes
come in pairs with the same spectral shape: one steady, one pulsing (on 2 frames, off 2 frames), so a single
frame cannot tell them apart (nor a pulsing event's off frames from silence) -- context can. Targets are the
active classes per frame; the metric is frame-level micro F1 on held-out clips.

    python -m fusedrnn.examples.events                                      # the real run
    python -m fusedrnn.examples.events --train-clips 128 --test-clips 32 --steps 40 --hidden 16  # tiny
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import fusedrnn

from ._common import DEFAULT_OUT, Progress, device, out_dir, pyplot

CLASSES = 10


def make_templates(n_freq: int, gen: torch.Generator) -> torch.Tensor:
    """[CLASSES, F]: class 2k and 2k+1 share a shape (two Gaussian bumps over frequency)."""
    f = torch.arange(n_freq, dtype=torch.float32)
    shapes = []
    for _ in range(CLASSES // 2):
        centres = torch.rand(2, generator=gen) * n_freq
        widths = 1.0 + 2.0 * torch.rand(2, generator=gen)
        shapes.append(sum(torch.exp(-0.5 * ((f - c) / w) ** 2) for c, w in zip(centres, widths)))
    return torch.stack([s for s in shapes for _ in range(2)])


def make_clips(n: int, frames: int, templates: torch.Tensor, max_events: int, noise: float,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """-> spectrograms [n, T, F], labels [n, T, CLASSES] (0/1)."""
    x = noise * torch.rand(n, frames, templates.shape[1], generator=gen)
    y = torch.zeros(n, frames, CLASSES)
    t = torch.arange(frames)
    pulse = ((t // 2) % 2 == 0).float()
    for i in range(n):
        for _ in range(int(torch.randint(1, max_events + 1, (1,), generator=gen))):
            c = int(torch.randint(0, CLASSES, (1,), generator=gen))
            dur = int(torch.randint(frames // 10, frames // 2, (1,), generator=gen))
            start = int(torch.randint(0, frames - dur, (1,), generator=gen))
            active = torch.zeros(frames)
            active[start:start + dur] = 1
            env = active * (pulse if c % 2 else 1.0) * (0.5 + torch.rand(1, generator=gen))
            x[i] += env[:, None] * templates[c][None, :]
            y[i, :, c] = torch.maximum(y[i, :, c], active)
    return torch.log1p(x), y


class FrameMLP(nn.Module):
    def __init__(self, n_freq: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_freq, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, CLASSES))

    def forward(self, x):
        return self.net(x)


class Recurrent(nn.Module):
    def __init__(self, n_freq: int, hidden: int, layers: int, bidirectional: bool) -> None:
        super().__init__()
        self.rnn = fusedrnn.LSTM(n_freq, hidden, layers, batch_first=True, bidirectional=bidirectional,
                                 merge_mode="sum")  # ignored when unidirectional
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def f1_score(logits: torch.Tensor, labels: torch.Tensor) -> float:
    pred = logits > 0
    tp = (pred & (labels > 0)).sum().item()
    fp = (pred & (labels == 0)).sum().item()
    fn = (~pred & (labels > 0)).sum().item()
    return 2 * tp / max(1, 2 * tp + fp + fn)


def train_eval(name, model, data, args, dev) -> dict:
    x_tr, y_tr, x_te, y_te = data
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    bar = Progress(args.steps, f"{name:<8}")
    t0 = time.perf_counter()
    loss_avg = None
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x_tr.shape[0], (args.batch,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(model(x_tr[idx].to(dev)), y_tr[idx].to(dev))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        bar.update(step, loss=loss_avg)
    bar.close()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x_te[i:i + 64].to(dev)).cpu() for i in range(0, x_te.shape[0], 64)])
    model.train()
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "f1": f1_score(logits, y_te),
            "loss": loss_avg, "seconds": time.perf_counter() - t0, "logits": logits}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--freq", type=int, default=40)
    ap.add_argument("--max-events", type=int, default=4)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--train-clips", type=int, default=2000)
    ap.add_argument("--test-clips", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=64, help="LSTM hidden size (the MLP gets 2x)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(DEFAULT_OUT, "events"))
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    dev = device()
    out = out_dir(args.out)
    gen = torch.Generator().manual_seed(args.seed)
    templates = make_templates(args.freq, gen)
    x_tr, y_tr = make_clips(args.train_clips, args.frames, templates, args.max_events, args.noise, gen)
    x_te, y_te = make_clips(args.test_clips, args.frames, templates, args.max_events, args.noise, gen)
    data = (x_tr, y_tr, x_te, y_te)
    print(f"events: {args.train_clips} training / {args.test_clips} test clips of {args.frames} frames x "
          f"{args.freq} bins, {CLASSES} classes, {y_te.mean().item() * CLASSES:.2f} active per frame, device {dev}")
    models = {
        "MLP": FrameMLP(args.freq, 2 * args.hidden),
        "LSTM": Recurrent(args.freq, args.hidden, args.layers, bidirectional=False),
        "BiLSTM": Recurrent(args.freq, args.hidden, args.layers, bidirectional=True),
    }
    results = [train_eval(name, m.to(dev), data, args, dev) for name, m in models.items()]
    # chance: each class predicted active with its own training frequency, independently of the input
    p = y_tr.mean((0, 1))
    chance = (2 * p * p).sum().item() / (p.sum().item() + p.sum().item()) if p.sum() > 0 else 0.0
    lines = ["| model | parameters | frame F1 | train s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['model']}{' (merge_mode=sum)' if r['model'] == 'BiLSTM' else ''} | {r['params']:,} | "
              f"{r['f1']:.3f} | {r['seconds']:.0f} |" for r in results]
    lines.append(f"| chance (class priors) | 0 | {chance:.3f} | |")
    print("\n".join(lines))

    plt = pyplot()
    fig, axes = plt.subplots(len(results) + 2, 1, figsize=(8, 1.6 * (len(results) + 2)), sharex=True)
    axes[0].imshow(x_te[0].T.numpy(), aspect="auto", origin="lower", cmap="magma")
    axes[0].set_ylabel("freq")
    axes[1].imshow(y_te[0].T.numpy(), aspect="auto", origin="lower", cmap="Greys", vmin=0, vmax=1)
    axes[1].set_ylabel("truth")
    for ax, r in zip(axes[2:], results):
        ax.imshow(torch.sigmoid(r["logits"][0]).T.numpy(), aspect="auto", origin="lower", cmap="Greys",
                  vmin=0, vmax=1)
        ax.set_ylabel(r["model"])
    axes[-1].set_xlabel("frame")
    fig.tight_layout()
    path = os.path.join(out, "events.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")
    for r in results:
        r.pop("logits")
    return {"results": results, "chance_f1": chance, "table": "\n".join(lines), "files": [path]}


if __name__ == "__main__":
    main()
