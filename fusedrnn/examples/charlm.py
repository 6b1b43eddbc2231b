"""Character-level language model on the docstrings of the Python standard library (or --text FILE).

A 2-layer fusedrnn.LSTM (or --cell gru) trained on random windows; bits per character on the held-out
last 10% of the text; a sample after each epoch; at the end greedy search, beam search, top-k and top-p
sampling continue the same prompt to the end of its line, with each continuation's log-probability.

    python -m fusedrnn.examples.charlm                    # the real run
    python -m fusedrnn.examples.charlm --max-chars 20000 --hidden 64 --epochs 1 --steps-per-epoch 30  # tiny
    torchrun --nproc-per-node 2 -m fusedrnn.examples.charlm   # DDP: each process takes half of every batch
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import fusedrnn

from ._common import DEFAULT_OUT, out_dir, pyplot
from ._distributed import Ranks, run_on_ranks

# Imported for their docstrings only: quiet, side-effect-free modules (no `this`, `antigravity`, GUI).
MODULES = """abc argparse ast asyncio base64 bisect bz2 calendar cmath codecs collections configparser contextlib
copy csv dataclasses datetime decimal difflib dis doctest email enum fnmatch fractions functools gettext glob
gzip hashlib heapq hmac http.client inspect io ipaddress itertools json locale logging lzma math numbers
operator optparse os pathlib pickle platform pprint queue random re sched secrets selectors shutil signal
socket statistics string struct subprocess tarfile tempfile textwrap threading tokenize traceback types
typing unittest urllib.parse uuid warnings weakref zipfile zlib""".split()


def stdlib_docstrings(max_chars: int) -> str:
    seen, parts, total = set(), [], 0
    for name in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module]
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            objects.append(obj)
            if inspect.isclass(obj):
                objects += [m for a, m in sorted(vars(obj).items()) if not a.startswith("_") and callable(m)]
        for obj in objects:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40 and doc not in seen:
                seen.add(doc)
                parts.append(doc.strip() + "\n\n")
                total += len(parts[-1])
                if total >= max_chars:
                    return "".join(parts)[:max_chars]
    return "".join(parts)


class CharLM(nn.Module):
    def __init__(self, vocab: int, emb: int, hidden: int, layers: int, cell: str, dropout: float) -> None:
        super().__init__()
        self.cell = cell
        self.emb = nn.Embedding(vocab, emb)
        rnn = fusedrnn.LSTM if cell == "lstm" else fusedrnn.GRU
        # dropout sits between layers only: none for a single layer (torch warns otherwise)
        self.rnn = rnn(emb, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        """x [B, T] -> logits [B, T, V], state in the module's own layout ([L, B, H] tensors)."""
        y, state = self.rnn(self.emb(x), state)
        return self.out(y), state

    # fusedrnn.decoding wants the sequences on dim 0 of every state tensor: [B, L, H] outside, [L, B, H] inside
    def to_batch_first(self, state):
        if self.cell == "lstm":
            return (state[0].transpose(0, 1), state[1].transpose(0, 1))
        return state.transpose(0, 1)

    def step(self, tokens, state):
        if self.cell == "lstm":
            inner = (state[0].transpose(0, 1).contiguous(), state[1].transpose(0, 1).contiguous())
        else:
            inner = state.transpose(0, 1).contiguous()
        logits, inner = self(tokens[:, None], inner)
        return logits[:, 0], self.to_batch_first(inner)


@torch.no_grad()
def bits_per_char(model, data: torch.Tensor, seq_len: int, batch: int, dev) -> float:
    """Held-out cross-entropy in bits, on consecutive windows with the state carried across them."""
    model.eval()
    n = (data.numel() - 1) // batch
    xs = data[:n * batch].view(batch, n).to(dev)
    ys = data[1:n * batch + 1].view(batch, n).to(dev)
    state, nll, count = None, 0.0, 0
    for i in range(0, n, seq_len):
        logits, state = model(xs[:, i:i + seq_len], state)
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys[:, i:i + seq_len].reshape(-1),
                               reduction="sum").item()
        count += ys[:, i:i + seq_len].numel()
    model.train()
    return nll / count / math.log(2)


@torch.no_grad()
def continuations(model, prompt: str, stoi, itos, dev, max_length: int, beam: int, top_k: int, top_p: float,
                  seed: int) -> list[tuple[str, str, float]]:
    """(method, text, log-probability of the text under the model) for each decoding method."""
    model.eval()
    ids = torch.tensor([[stoi[c] for c in prompt]], device=dev)
    _, state = model(ids[:, :-1])
    state = model.to_batch_first(state)
    start = ids[:, -1]
    eos = stoi["\n"]
    rows = []
    g = fusedrnn.greedy_search(model.step, start, state, max_length=max_length, eos_token_id=eos)
    rows.append(("greedy", g.sequences[0, :g.lengths[0]], float(g.log_probs[0])))
    b = fusedrnn.beam_search(model.step, start, state, beam_size=beam, max_length=max_length, eos_token_id=eos)
    rows.append((f"beam {beam}", b.sequences[0, 0, :b.lengths[0, 0]], float(b.log_probs[0, 0])))
    gen = torch.Generator(device=dev).manual_seed(seed)
    for name, kw in ((f"top-k {top_k}", {"top_k": top_k}), (f"top-p {top_p}", {"top_p": top_p})):
        tok, st, out, logp = start, state, [], 0.0
        for _ in range(max_length):
            logits, st = model.step(tok, st)
            tok = fusedrnn.sample(logits, **kw, generator=gen)
            logp += float(torch.log_softmax(logits.float(), -1)[0, tok[0]])  # under the unfiltered model
            out.append(int(tok[0]))
            if out[-1] == eos:
                break
        rows.append((name, torch.tensor(out), logp))
    model.train()
    return [(name, "".join(itos[int(t)] for t in seq).rstrip("\n"), lp) for name, seq, lp in rows]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", help="train on this file instead of the standard library's docstrings")
    ap.add_argument("--max-chars", type=int, default=600_000)
    ap.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--emb", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--seq-len", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--steps-per-epoch", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--prompt", default="Return the ")
    ap.add_argument("--gen-length", type=int, default=80)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(DEFAULT_OUT, "charlm"))
    args = ap.parse_args(argv)
    return run_on_ranks(_main, args)


def _main(args, ranks: Ranks) -> dict:
    torch.manual_seed(args.seed)
    dev = ranks.device
    out = out_dir(args.out)
    if args.text:
        with open(args.text, encoding="utf-8", errors="replace") as f:
            text = f.read()[:args.max_chars]
    else:
        text = stdlib_docstrings(args.max_chars)
    chars = sorted(set(text) | set(args.prompt) | {"\n"})
    stoi = {c: i for i, c in enumerate(chars)}
    itos = dict(enumerate(chars))
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * data.numel())
    train, held = data[:split], data[split:]
    model = CharLM(len(chars), args.emb, args.hidden, args.layers, args.cell, args.dropout).to(dev)
    trained = ranks.wrap(model)  # generation and evaluation use `model` itself
    opt = torch.optim.Adam(trained.parameters(), lr=args.lr)
    total = args.epochs * args.steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    n_params = sum(p.numel() for p in model.parameters())
    ranks.print(f"charlm: {len(text)} chars ({'--text' if args.text else 'stdlib docstrings'}), vocab {len(chars)}, "
                f"{args.layers}-layer {args.cell.upper()} {args.hidden}, {n_params} parameters, device {dev}"
                + (f", {ranks.world_size} processes (DDP)" if ranks.distributed else ""))
    ranks.print(f"uniform baseline: {math.log2(len(chars)):.3f} bits/char")
    gen = torch.Generator().manual_seed(args.seed)  # the same global batches on every rank
    history, t0, step = [], time.perf_counter(), 0
    for epoch in range(1, args.epochs + 1):
        bar = ranks.progress(args.steps_per_epoch, f"epoch {epoch}")
        loss_avg = None
        for i in range(args.steps_per_epoch):
            starts = torch.randint(0, train.numel() - args.seq_len - 1, (args.batch,), generator=gen)
            window, = ranks.shard(torch.stack([train[s:s + args.seq_len + 1] for s in starts.tolist()]))
            window = window.to(dev)
            logits, _ = trained(window[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, len(chars)), window[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
            bar.update(i + 1, bpc=loss_avg / math.log(2))
        bar.close()
        bpc = bits_per_char(model, held, args.seq_len, min(args.batch, max(1, held.numel() // 200)), dev)
        history.append((step, loss_avg / math.log(2), bpc))
        sample = continuations(model, args.prompt, stoi, itos, dev, args.gen_length, args.beam, args.top_k,
                               args.top_p, args.seed + epoch)[3][1]
        ranks.print(f"epoch {epoch}: train {loss_avg / math.log(2):.3f} bits/char, held-out {bpc:.3f} bits/char, "
                    f"{time.perf_counter() - t0:.0f}s")
        ranks.print(f"  sample (top-p {args.top_p}): {args.prompt!r} + {sample!r}")

    ranks.print(f"decoding {args.prompt!r} to the end of the line:")
    rows = continuations(model, args.prompt, stoi, itos, dev, args.gen_length, args.beam, args.top_k, args.top_p,
                         args.seed)
    for name, cont, logp in rows:
        ranks.print(f"  {name:<10} log p = {logp:8.2f}  {args.prompt + cont!r}")
    results = {"bpc": history[-1][2], "uniform_bpc": math.log2(len(chars)), "decodings": rows, "files": []}
    if not ranks.is_main:
        return results
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([h[0] for h in history], [h[1] for h in history], "o-", label="train (running)")
    ax.plot([h[0] for h in history], [h[2] for h in history], "s-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "bpc.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved {path}")
    results["files"].append(path)
    return results


if __name__ == "__main__":
    main()
