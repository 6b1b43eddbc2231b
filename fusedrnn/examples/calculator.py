"""Seq2seq calculator with attention: "123+45" -> "168", "12-345" -> "-333".

A bidirectional fusedrnn.LSTM (merge_mode="sum") encodes the characters, an LSTM decoder attends over
them with fusedrnn.nn.Attention (Luong "general"), trained with teacher forcing on problems generated
on the fly; a held-out set (never generated for training) is decoded with fusedrnn.beam_search.

    python -m fusedrnn.examples.calculator            # the real run (prints held-out exact match)
    python -m fusedrnn.examples.calculator --digits 1 --steps 200 --hidden 32   # tiny
"""
from __future__ import annotations

import argparse
import os
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

import fusedrnn
from fusedrnn.nn import Attention

from ._common import DEFAULT_OUT, Progress, device, out_dir, pyplot

PAD, SOS, EOS = 0, 1, 2
CHARS = "0123456789+-"
STOI = {ch: i + 3 for i, ch in enumerate(CHARS)}
ITOS = {i: ch for ch, i in STOI.items()}
VOCAB = len(CHARS) + 3


def problem(rng: random.Random, digits: int) -> tuple[str, str]:
    # operand lengths drawn uniformly, so short operands are not swamped by 3-digit ones
    a = rng.randint(0, 10 ** rng.randint(1, digits) - 1)
    b = rng.randint(0, 10 ** rng.randint(1, digits) - 1)
    op = rng.choice("+-")
    return f"{a}{op}{b}", str(a + b if op == "+" else a - b)


def encode(strings: list[str], eos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [[STOI[c] for c in s] + ([EOS] if eos else []) for s in strings]
    lengths = torch.tensor([len(s) for s in seqs])
    out = torch.full((len(seqs), int(lengths.max())), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s)
    return out, lengths


def decode(tokens) -> str:
    return "".join(ITOS.get(int(t), "") for t in tokens if int(t) != EOS)


class Seq2Seq(nn.Module):
    """Luong-style global attention without input feeding: the decoder LSTM runs over the whole
    teacher-forced target in one fused call, and attention is one batched [B, T_out, T_in] call."""

    def __init__(self, emb: int, hidden: int) -> None:
        super().__init__()
        self.src_emb = nn.Embedding(VOCAB, emb, padding_idx=PAD)
        self.tgt_emb = nn.Embedding(VOCAB, emb, padding_idx=PAD)
        # merge_mode="sum": keys of size `hidden`, so the attention's W is hidden x hidden
        self.encoder = fusedrnn.LSTM(emb, hidden, batch_first=True, bidirectional=True, merge_mode="sum")
        self.bridge = nn.Linear(2 * hidden, 2 * hidden)          # encoder final (h_f, h_b) -> decoder (h, c)
        self.decoder = fusedrnn.LSTM(emb, hidden, batch_first=True)
        self.attention = Attention(hidden, hidden, score="general")
        self.combine = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, VOCAB)

    def encode(self, src: torch.Tensor, lengths: torch.Tensor):
        """-> decoder state (h [B, H], c [B, H], keys [B, T_in, H], mask [B, T_in]), batch first everywhere
        so fusedrnn.decoding's default reorder_state applies."""
        keys, (h_n, _) = self.encoder(self.src_emb(src), lengths=lengths)
        h, c = torch.tanh(self.bridge(torch.cat([h_n[0], h_n[1]], -1))).chunk(2, -1)
        mask = torch.arange(src.shape[1], device=src.device)[None] < lengths.to(src.device)[:, None]
        return (h.contiguous(), c.contiguous(), keys, mask)

    def decode(self, tgt_in: torch.Tensor, state):
        """tgt_in [B, T] -> (logits [B, T, V], attention weights [B, T, T_in], new state)."""
        h, c, keys, mask = state
        y, (h_n, c_n) = self.decoder(self.tgt_emb(tgt_in), (h[None].contiguous(), c[None].contiguous()))
        context, weights = self.attention(y, keys, mask=mask)
        logits = self.out(torch.tanh(self.combine(torch.cat([y, context], -1))))
        return logits, weights, (h_n[0], c_n[0], keys, mask)

    def step(self, tokens: torch.Tensor, state):
        """One decoder step in fusedrnn.decoding's step(tokens [N], state) -> (logits [N, V], state) form."""
        logits, _, state = self.decode(tokens[:, None], state)
        return logits[:, 0], state

    def forward(self, src, lengths, tgt_in):
        """Teacher forcing: logits [B, T_tgt, V] for the target shifted right (tgt_in starts with SOS)."""
        return self.decode(tgt_in, self.encode(src, lengths))[0]


def make_batch(pairs, dev):
    src, src_len = encode([p[0] for p in pairs], eos=False)
    tgt, _ = encode([p[1] for p in pairs], eos=True)
    tgt_in = torch.cat([torch.full((len(pairs), 1), SOS), tgt[:, :-1]], 1)
    return src.to(dev), src_len, tgt_in.to(dev), tgt.to(dev)


@torch.no_grad()
def predict(model, pairs, dev, beam_size: int, max_length: int) -> list[str]:
    model.eval()
    src, src_len, _, _ = make_batch(pairs, dev)
    start = torch.full((len(pairs),), SOS, dtype=torch.long, device=dev)
    if beam_size > 1:
        result = fusedrnn.beam_search(model.step, start, model.encode(src, src_len), beam_size=beam_size,
                                      max_length=max_length, eos_token_id=EOS, pad_token_id=PAD)
        best = result.sequences[:, 0]
    else:
        best = fusedrnn.greedy_search(model.step, start, model.encode(src, src_len), max_length=max_length,
                                      eos_token_id=EOS, pad_token_id=PAD).sequences
    model.train()
    return [decode(row) for row in best.cpu()]


@torch.no_grad()
def attention_map(model, pair, prediction, dev):
    """The decoder's attention weights [T_out, T_in] while it reads back its own prediction."""
    model.eval()
    src, src_len, _, _ = make_batch([pair], dev)
    tokens = torch.tensor([[SOS] + [STOI[ch] for ch in prediction]], device=dev)
    weights = model.decode(tokens, model.encode(src, src_len))[1][0].cpu()
    model.train()
    return weights


def save_heatmaps(model, pairs, predictions, dev, path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.2 * len(pairs), 3.2))
    for ax, pair, pred in zip(axes if len(pairs) > 1 else [axes], pairs, predictions):
        w = attention_map(model, pair, pred, dev).numpy()
        ax.imshow(w, cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(pair[0])), list(pair[0]))
        ax.set_yticks(range(len(pred) + 1), list(pred) + ["<eos>"])
        ax.set_title(f"{pair[0]} = {pred}" + ("" if pred == pair[1] else f" (true {pair[1]})"), fontsize=9)
        ax.set_xlabel("input")
    axes_first = axes[0] if len(pairs) > 1 else axes
    axes_first.set_ylabel("output")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--digits", type=int, default=3, help="max digits per operand")
    ap.add_argument("--emb", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--steps", type=int, default=15000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=2500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(DEFAULT_OUT, "calculator"))
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    dev = device()
    out = out_dir(args.out)
    test = {}
    while len(test) < args.test_size:
        src, tgt = problem(rng, args.digits)
        test[src] = tgt
    test_pairs = sorted(test.items())
    rng.shuffle(test_pairs)
    # held-out inputs: never used for training (with 1-digit operands that may leave few to train on)
    space = 2 * sum(9 * 10 ** (d - 1) + (d == 1) for d in range(1, args.digits + 1)) ** 2
    if len(test) > space // 2:
        raise SystemExit(f"--test-size {args.test_size} leaves too few training problems (~{space} exist)")
    max_len = args.digits + 3  # sign + digits + carry + EOS

    model = Seq2Seq(args.emb, args.hidden).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"calculator: {args.digits}-digit +/-, {n_params} parameters, device {dev}, "
          f"{len(test_pairs)} held-out problems")
    bar = Progress(args.steps, "train")
    t0, loss_avg, acc = time.perf_counter(), None, float("nan")
    for step in range(1, args.steps + 1):
        batch = []
        while len(batch) < args.batch:
            src, tgt = problem(rng, args.digits)
            if src not in test:
                batch.append((src, tgt))
        src, src_len, tgt_in, tgt = make_batch(batch, dev)
        logits = model(src, src_len, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        bar.update(step, loss=loss_avg)
        if step % args.eval_every == 0 or step == args.steps:
            sub = test_pairs[:200]
            preds = predict(model, sub, dev, 1, max_len)
            acc = sum(p == t for p, (_, t) in zip(preds, sub)) / len(sub)
            bar.close()
            print(f"step {step}: loss {loss_avg:.4f}  greedy exact match (200 held-out) {acc:.3f}  "
                  f"{time.perf_counter() - t0:.0f}s")
            if step < args.steps:
                bar = Progress(args.steps, "train")
    train_s = time.perf_counter() - t0

    preds = []
    for i in range(0, len(test_pairs), 256):
        preds += predict(model, test_pairs[i:i + 256], dev, args.beam, max_len)
    exact = sum(p == t for p, (_, t) in zip(preds, test_pairs)) / len(test_pairs)
    print(f"held-out exact match (beam {args.beam}): {exact:.4f} on {len(test_pairs)} problems "
          f"(training {train_s:.0f}s)")
    for (src, tgt), pred in list(zip(test_pairs, preds))[:5]:
        print(f"  {src:>9} = {pred:<6} {'ok' if pred == tgt else 'WRONG, ' + tgt}")
    path = os.path.join(out, "attention.png")
    save_heatmaps(model, test_pairs[:4], preds[:4], dev, path)
    print(f"saved {path}")
    return {"exact_match": exact, "loss": loss_avg, "train_seconds": train_s, "files": [path]}


if __name__ == "__main__":
    main()
