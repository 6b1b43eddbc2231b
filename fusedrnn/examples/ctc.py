"""Connectionist temporal classification in the style of Graves et al. (2006): a stacked bidirectional LSTM
trained with torch.nn.CTCLoss on unsegmented synthetic "speech", against unidirectional and tanh-RNN stacks.

Each utterance is a sequence of --min-symbols..--max-symbols symbols from a --symbols-letter alphabet,
spoken one after the other with no alignment given: a symbol is three feature-vector "phases" (onset,
middle, offset) of variable duration, with noise and random loudness, and short pauses between symbols.
Symbols come in pairs that share onset and middle and differ only in their offset, and pairs that share
middle and offset and differ only in their onset, so a frame alone, or the past alone, is often ambiguous.
Outputs: per-frame softmax over the alphabet + blank, decoded greedily (best path) and with CTC prefix beam
search; the metric is the label error rate (edit distance / reference length) on held-out utterances.

    python -m fusedrnn.examples.ctc                                      # the real run
    python -m fusedrnn.examples.ctc --steps 100 --hidden 32 --layers 1   # tiny
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import fusedrnn

from ._common import DEFAULT_OUT, Progress, device, out_dir, pyplot

BLANK = 0


def make_symbols(n_symbols: int, n_feat: int, gen: torch.Generator) -> torch.Tensor:
    """[S, 3, F] phase templates: symbols 4j..4j+3 = (a, b, c), (a, b, d), (e, b, c)... sharing parts."""
    pool = torch.randn(3 * n_symbols, n_feat, generator=gen)
    phases = []
    for s in range(n_symbols):
        group, kind = divmod(s, 4)
        onset, middle, offset = 3 * group * 4, 3 * group * 4 + 1, 3 * group * 4 + 2
        if kind == 1:
            offset += 3       # same onset and middle as kind 0, another offset
        elif kind == 2:
            onset += 6        # same middle and offset as kind 0, another onset
        elif kind == 3:
            onset, offset = onset + 6, offset + 3
        phases.append(pool[[onset % len(pool), middle % len(pool), offset % len(pool)]])
    return torch.stack(phases)


def utterances(n: int, symbols: torch.Tensor, args, gen: torch.Generator):
    """-> features [n, T_max, F], frame lengths [n], labels (concatenated, 1-based), label lengths [n]."""
    feats, labels, label_lengths = [], [], []
    n_symbols, _, n_feat = symbols.shape
    for _ in range(n):
        k = int(torch.randint(args.min_symbols, args.max_symbols + 1, (1,), generator=gen))
        seq = torch.randint(0, n_symbols, (k,), generator=gen)
        frames = [torch.zeros(int(torch.randint(0, 3, (1,), generator=gen)), n_feat)]
        for s in seq.tolist():
            loud = 0.7 + 0.6 * torch.rand(1, generator=gen)
            for p in range(3):
                d = int(torch.randint(args.min_phase, args.max_phase + 1, (1,), generator=gen))
                frames.append(loud * symbols[s, p].expand(d, n_feat))
            frames.append(torch.zeros(int(torch.randint(0, 3, (1,), generator=gen)), n_feat))
        x = torch.cat(frames)
        feats.append(x + args.noise * torch.randn(x.shape, generator=gen))
        labels.append(seq + 1)
        label_lengths.append(k)
    lengths = torch.tensor([len(f) for f in feats])
    x = torch.zeros(n, int(lengths.max()), n_feat)
    for i, f in enumerate(feats):
        x[i, :len(f)] = f
    return x, lengths, torch.cat(labels), torch.tensor(label_lengths)


class Recogniser(nn.Module):
    def __init__(self, cell: str, n_feat: int, hidden: int, layers: int, bidirectional: bool, n_labels: int,
                 forget_bias: float = 0.0):
        super().__init__()
        if cell == "lstm":
            self.rnn = fusedrnn.LSTM(n_feat, hidden, layers, batch_first=True, bidirectional=bidirectional)
            # gates i, f, g, o: the forget gate starts open (Gers et al., 2000; Jozefowicz et al., 2015)
            with torch.no_grad():
                for name, p in self.rnn.named_parameters():
                    if name.startswith("bias_ih"):
                        p[hidden:2 * hidden].fill_(forget_bias)
        else:
            self.rnn = fusedrnn.RNN(n_feat, hidden, layers, batch_first=True, bidirectional=bidirectional,
                                    nonlinearity="tanh")
        self.out = nn.Linear(hidden * (2 if bidirectional else 1), n_labels + 1)

    def forward(self, x, lengths):
        """-> log-probabilities [B, T, labels + blank]; the backward direction starts at each utterance's end."""
        y, _ = self.rnn(x, lengths=lengths)
        return F.log_softmax(self.out(y), -1)


def greedy_decode(log_probs: torch.Tensor, length: int) -> list[int]:
    """Best path: the most likely label per frame, repeats merged, blanks removed."""
    out, prev = [], BLANK
    for k in log_probs[:length].argmax(-1).tolist():
        if k != prev and k != BLANK:
            out.append(k)
        prev = k
    return out


def _logadd(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def prefix_beam_decode(log_probs: torch.Tensor, length: int, beam: int, prune: float = -8.0) -> list[int]:
    """CTC prefix beam search: the most probable labelling (summed over its alignments) among `beam` prefixes
    kept per frame; each prefix holds (log P ending in blank, log P ending in its last label)."""
    beams = {(): (0.0, -math.inf)}
    lp = log_probs[:length].tolist()
    for t in range(length):
        frame = lp[t]
        candidates = [k for k, v in enumerate(frame) if v > prune] or [max(range(len(frame)), key=frame.__getitem__)]
        nxt: dict = collections.defaultdict(lambda: (-math.inf, -math.inf))
        for prefix, (pb, pnb) in beams.items():
            total = _logadd(pb, pnb)
            for k in candidates:
                p = frame[k]
                if k == BLANK:
                    b, nb = nxt[prefix]
                    nxt[prefix] = (_logadd(b, total + p), nb)
                    continue
                last = prefix[-1] if prefix else None
                ext = prefix + (k,)
                b, nb = nxt[ext]
                # a repeated label needs a blank in between; without one it stays in the same prefix
                nxt[ext] = (b, _logadd(nb, (pb if k == last else total) + p))
                if k == last:
                    b, nb = nxt[prefix]
                    nxt[prefix] = (b, _logadd(nb, pnb + p))
        beams = dict(sorted(nxt.items(), key=lambda kv: -_logadd(*kv[1]))[:beam])
    return list(max(beams.items(), key=lambda kv: _logadd(*kv[1]))[0])


def edit_distance(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def split_labels(labels: torch.Tensor, label_lengths: torch.Tensor) -> list[list[int]]:
    return [chunk.tolist() for chunk in torch.split(labels, label_lengths.tolist())]


@torch.no_grad()
def evaluate(model, test, beam: int, dev) -> dict:
    x, lengths, labels, label_lengths = test
    model.eval()
    log_probs = torch.cat([model(x[i:i + 128].to(dev), lengths[i:i + 128]).cpu()
                           for i in range(0, x.shape[0], 128)])
    model.train()
    refs = split_labels(labels, label_lengths)
    total = sum(len(r) for r in refs)
    greedy = [greedy_decode(log_probs[i], int(lengths[i])) for i in range(len(refs))]
    beamed = [prefix_beam_decode(log_probs[i], int(lengths[i]), beam) for i in range(len(refs))]
    return {"greedy_ler": sum(edit_distance(h, r) for h, r in zip(greedy, refs)) / total,
            "beam_ler": sum(edit_distance(h, r) for h, r in zip(beamed, refs)) / total,
            "log_probs": log_probs[:1], "example": (refs[0], greedy[0], beamed[0])}


def train_eval(name, model, train_fn, test, args, dev) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    ctc = nn.CTCLoss(blank=BLANK, zero_infinity=True)
    gen = torch.Generator().manual_seed(args.seed)
    bar = Progress(args.steps, f"{name:<12}")
    t0, loss_avg = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        x, lengths, labels, label_lengths = train_fn(gen)
        log_probs = model(x.to(dev), lengths)
        loss = ctc(log_probs.transpose(0, 1), labels.to(dev), lengths.to(dev), label_lengths.to(dev))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        bar.update(step, ctc=loss_avg)
    bar.close()
    seconds = time.perf_counter() - t0
    res = evaluate(model, test, args.beam, dev)
    res.update(model=name, params=sum(p.numel() for p in model.parameters()), seconds=seconds, loss=loss_avg)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--symbols", type=int, default=12)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--min-symbols", type=int, default=3)
    ap.add_argument("--max-symbols", type=int, default=8)
    ap.add_argument("--min-phase", type=int, default=1, help="frames per phase (3 phases per symbol)")
    ap.add_argument("--max-phase", type=int, default=3)
    ap.add_argument("--noise", type=float, default=0.8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--forget-bias", type=float, default=1.0, help="initial LSTM forget-gate bias (b_ih)")
    ap.add_argument("--models", nargs="+", default=["rnn", "birnn", "lstm", "bilstm"],
                    choices=["rnn", "birnn", "lstm", "bilstm"])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--beam", type=int, default=8)
    ap.add_argument("--test-size", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(DEFAULT_OUT, "ctc"))
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    dev = device()
    out = out_dir(args.out)
    symbols = make_symbols(args.symbols, args.features, torch.Generator().manual_seed(args.seed))
    test = utterances(args.test_size, symbols, args, torch.Generator().manual_seed(10_000 + args.seed))
    print(f"ctc: {args.symbols} symbols (+ blank), {args.features} features, {args.min_symbols}-{args.max_symbols} "
          f"symbols per utterance, {int(test[1].min())}-{int(test[1].max())} frames; {args.layers}-layer stacks "
          f"of {args.hidden}, {args.steps} steps of {args.batch}, {args.test_size} held-out utterances, device {dev}")
    specs = {"rnn": ("RNN-tanh", "rnn", False), "birnn": ("BiRNN-tanh", "rnn", True),
             "lstm": ("LSTM", "lstm", False), "bilstm": ("BiLSTM", "lstm", True)}
    results = []
    for key in args.models:
        name, cell, bi = specs[key]
        torch.manual_seed(args.seed)
        model = Recogniser(cell, args.features, args.hidden, args.layers, bi, args.symbols, args.forget_bias).to(dev)
        results.append(train_eval(name, model, lambda g: utterances(args.batch, symbols, args, g), test, args, dev))
        r = results[-1]
        print(f"{name:<11} label error rate: greedy {r['greedy_ler']:.3f}, beam {args.beam} {r['beam_ler']:.3f} "
              f"({r['seconds']:.0f}s)")
    lines = [f"| model ({args.layers} layers of {args.hidden}) | parameters | LER greedy | LER beam {args.beam} | train s |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['params']:,} | {r['greedy_ler']:.3f} | {r['beam_ler']:.3f} | {r['seconds']:.0f} |"
              for r in results]
    print("\n".join(lines))
    ref, g, b = results[-1]["example"]
    letters = lambda seq: "".join(chr(ord("a") + k - 1) for k in seq)  # noqa: E731
    print(f"held-out utterance 0: reference {letters(ref)!r}, {results[-1]['model']} greedy {letters(g)!r}, "
          f"beam {letters(b)!r}")

    plt = pyplot()
    fig, axes = plt.subplots(len(results) + 1, 1, figsize=(9, 1.5 + 1.5 * len(results)), sharex=True)
    length = int(test[1][0])
    axes[0].imshow(test[0][0, :length].T.numpy(), aspect="auto", origin="lower", cmap="magma")
    axes[0].set_ylabel("features")
    axes[0].set_title(f"held-out utterance: {letters(ref)!r}", fontsize=9)
    for ax, r in zip(axes[1:], results):
        probs = r["log_probs"][0, :length].exp().numpy()
        ax.plot(probs[:, BLANK], color="grey", ls="--", lw=1)
        for k in range(1, probs.shape[1]):
            ax.plot(probs[:, k], lw=1.2)
        ax.set_ylabel(r["model"], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{r['model']}: LER {r['beam_ler']:.3f} (beam); blank dashed", fontsize=8)
    axes[-1].set_xlabel("frame")
    fig.tight_layout()
    path = os.path.join(out, "ctc.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")
    for r in results:
        r.pop("log_probs")
    return {"results": results, "table": "\n".join(lines), "files": [path]}


if __name__ == "__main__":
    main()
