"""Many-to-one text classification: which of 10 standard-library packages does a docstring come from?

The textbook models, side by side: Embedding(1000, 64) -> SimpleRNN(128) / LSTM(128) / GRU(128) -> Linear(10)
(softmax in the loss), and a deep encoder Embedding -> GRU(256, every step) -> RNN(128) -> Linear(10). The
docstrings are read at run time from the installed standard library's source files (parsed with `ast`, no
import, no network); the vocabulary is the 998 most frequent training tokens + <pad> + <unk>. Each batch
holds docstrings of different lengths, run through fusedrnn's `lengths=`: the last state of every sequence is
its own last token's, so padding has no effect.

Parameter counts: torch.nn's RNN/LSTM have two bias vectors per layer (b_ih and b_hh), Keras' SimpleRNN/LSTM
one, so the Keras layer of the same size has `gates * hidden` fewer; Keras' GRU (reset_after=True, its default)
keeps two, like torch.

    python -m fusedrnn.examples.classify                                  # the real run
    python -m fusedrnn.examples.classify --epochs 2 --max-docs 150 --hidden 32   # tiny
"""
from __future__ import annotations

import argparse
import ast
import collections
import importlib.util
import os
import random
import re
import time

import torch
import torch.nn.functional as F
from torch import nn

import fusedrnn

from ._common import DEFAULT_OUT, Progress, device, out_dir, pyplot

# The first 10 of these found in the installed standard library (all are in 3.9-3.13), each a package with
# 80 or more docstrings in its source.
PACKAGES = ["asyncio", "email", "unittest", "logging", "multiprocessing", "xml", "http", "importlib", "tkinter",
            "urllib", "lib2to3", "idlelib", "concurrent", "json"]
CLASSES = 10
PAD, UNK = 0, 1
TOKEN = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")


def package_docstrings(package: str, max_docs: int) -> list[str]:
    """Docstrings (modules, classes, functions) in a package's own .py files, tests skipped, deduplicated."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    docs: dict[str, None] = {}
    for root in spec.submodule_search_locations:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(("test", "idle_test", "__pycache__")))
            for name in sorted(filenames):
                if not name.endswith(".py") or name.startswith("test"):
                    continue
                try:
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        tree = ast.parse(f.read())
                except (SyntaxError, UnicodeDecodeError, OSError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node)
                        if doc and len(doc) > 40:
                            docs[doc] = None
    return list(docs)[:max_docs]


def tokenize(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


class Classifier(nn.Module):
    """Embedding -> recurrent encoder (its last state per sequence) -> Linear."""

    def __init__(self, kind: str, vocab: int, emb: int, hidden: int, deep_hidden: int, dropout: float) -> None:
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(vocab, emb, padding_idx=PAD)
        if kind == "deep":
            self.lower = fusedrnn.GRU(emb, deep_hidden, batch_first=True)      # return_sequences=True
            self.rnn = fusedrnn.RNN(deep_hidden, hidden, batch_first=True)     # tanh, last state only
        else:
            self.rnn = {"rnn": fusedrnn.RNN, "lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU}[kind](
                emb, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.emb(x))
        if self.kind == "deep":
            h, _ = self.lower(h, lengths=lengths)
        _, state = self.rnn(h, lengths=lengths)
        h_n = state[0] if isinstance(state, tuple) else state   # [1, B, H]: each sequence's own last step
        return self.out(self.drop(h_n[-1]))


def keras_params(model: Classifier) -> int:
    """The parameter count of the same model built from Keras layers: SimpleRNN and LSTM have one bias vector
    (torch.nn: b_ih and b_hh), GRU(reset_after=True) two, like torch; Embedding and Dense the same."""
    n = sum(p.numel() for p in model.parameters())
    for module in (model.rnn, getattr(model, "lower", None)):
        if module is not None and module.cell != "gru":
            n -= sum(p.numel() for name, p in module.named_parameters() if name.startswith("bias_hh"))
    return n


def batches(data, batch: int, shuffle: bool, rng: random.Random | None, dev):
    """Batches of similar lengths (sorted in chunks of 20 batches), padded; lengths go to the RNNs."""
    order = list(range(len(data)))
    if shuffle:
        rng.shuffle(order)
    chunk = 20 * batch
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: len(data[i][0]))
        groups = [part[i:i + batch] for i in range(0, len(part), batch)]
        if shuffle:
            rng.shuffle(groups)
        for g in groups:
            lengths = torch.tensor([len(data[i][0]) for i in g])
            x = torch.full((len(g), int(lengths.max())), PAD, dtype=torch.long)
            for row, i in enumerate(g):
                x[row, :len(data[i][0])] = torch.tensor(data[i][0])
            yield x.to(dev), lengths, torch.tensor([data[i][1] for i in g], device=dev)


@torch.no_grad()
def accuracy(model, data, batch: int, dev) -> tuple[float, torch.Tensor]:
    model.eval()
    correct, confusion = 0, torch.zeros(CLASSES, CLASSES, dtype=torch.long)
    for x, lengths, y in batches(data, batch, False, None, dev):
        pred = model(x, lengths).argmax(-1)
        correct += (pred == y).sum().item()
        for t, p in zip(y.tolist(), pred.tolist()):
            confusion[t, p] += 1
    model.train()
    return correct / len(data), confusion


def train_eval(name: str, model, train, test, args, dev) -> dict:
    torch.manual_seed(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = random.Random(args.seed)
    steps_per_epoch = (len(train) + args.batch - 1) // args.batch
    bar = Progress(args.epochs * steps_per_epoch, f"{name:<10}")
    t0, step, loss_avg, curve = time.perf_counter(), 0, None, []
    for epoch in range(args.epochs):
        for x, lengths, y in batches(train, args.batch, True, rng, dev):
            loss = F.cross_entropy(model(x, lengths), y)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
            bar.update(step, loss=loss_avg, acc=curve[-1] if curve else 0.0)
        curve.append(accuracy(model, test, 256, dev)[0])
        bar.update(step, loss=loss_avg, acc=curve[-1])
    bar.close()
    seconds = time.perf_counter() - t0
    acc, confusion = accuracy(model, test, 256, dev)
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "keras_params": keras_params(model),
            "accuracy": acc, "curve": curve, "seconds": seconds, "confusion": confusion}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=1000, help="tokens, <pad> and <unk> included")
    ap.add_argument("--emb", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--deep-hidden", type=int, default=256, help="the deep encoder's lower GRU")
    ap.add_argument("--models", nargs="+", default=["rnn", "lstm", "gru", "deep"],
                    choices=["rnn", "lstm", "gru", "deep"])
    ap.add_argument("--max-docs", type=int, default=400, help="per package")
    ap.add_argument("--max-tokens", type=int, default=48, help="docstrings are cut to their first N tokens")
    ap.add_argument("--test-frac", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(DEFAULT_OUT, "classify"))
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    dev = device()
    out = out_dir(args.out)
    labels, docs = [], []
    for package in PACKAGES:
        found = package_docstrings(package, args.max_docs)
        if len(found) >= min(80, args.max_docs):
            labels.append(package)
            docs.append(found)
        if len(labels) == CLASSES:
            break
    if len(labels) < CLASSES:
        raise SystemExit(f"found only {len(labels)} standard-library packages with enough docstrings: {labels}")
    rng = random.Random(args.seed)
    train_raw, test_raw = [], []
    for c, found in enumerate(docs):
        found = found[:]
        rng.shuffle(found)
        n_test = max(1, int(round(args.test_frac * len(found))))
        test_raw += [(d, c) for d in found[:n_test]]
        train_raw += [(d, c) for d in found[n_test:]]
    counts = collections.Counter(t for d, _ in train_raw for t in tokenize(d))
    itos = ["<pad>", "<unk>"] + [t for t, _ in counts.most_common(args.vocab - 2)]
    stoi = {t: i for i, t in enumerate(itos)}

    def encode(raw):
        return [([stoi.get(t, UNK) for t in tokenize(d)][:args.max_tokens] or [UNK], c) for d, c in raw]

    train, test = encode(train_raw), encode(test_raw)
    lengths = [len(x) for x, _ in train]
    majority = max(collections.Counter(c for _, c in test).values()) / len(test)
    print(f"classify: {len(train)} training / {len(test)} held-out docstrings from {', '.join(labels)}; "
          f"vocabulary {len(itos)}, lengths {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}), "
          f"device {dev}; chance 10% (majority class {majority:.1%})")
    names = {"rnn": "SimpleRNN", "lstm": "LSTM", "gru": "GRU", "deep": "GRU256+RNN"}
    results = []
    for kind in args.models:
        torch.manual_seed(args.seed)
        model = Classifier(kind, len(itos), args.emb, args.hidden, args.deep_hidden, args.dropout).to(dev)
        results.append(train_eval(names[kind], model, train, test, args, dev))
        r = results[-1]
        print(f"{r['model']:<10} held-out accuracy {r['accuracy']:.3f}  ({r['seconds']:.0f}s)")
    lines = ["| model | parameters (torch.nn) | Keras equivalent | held-out accuracy | train s |",
             "|---|---:|---:|---:|---:|"]
    arch = {"SimpleRNN": f"SimpleRNN({args.hidden})", "LSTM": f"LSTM({args.hidden})", "GRU": f"GRU({args.hidden})",
            "GRU256+RNN": f"GRU({args.deep_hidden}) -> RNN({args.hidden})"}
    lines += [f"| Embedding({len(itos)}, {args.emb}) -> {arch[r['model']]} -> Linear({CLASSES}) | {r['params']:,} | "
              f"{r['keras_params']:,} | {r['accuracy']:.3f} | {r['seconds']:.0f} |" for r in results]
    lines.append(f"| chance (uniform) | | | {1 / CLASSES:.3f} | |")
    print("\n".join(lines))
    print("Keras equivalent: SimpleRNN/LSTM have one bias vector per layer where torch.nn has two (b_ih, b_hh); "
          "Keras' GRU (reset_after=True, its default) keeps two, like torch.")

    plt = pyplot()
    best = max(results, key=lambda r: r["accuracy"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], "o-", ms=3, label=r["model"])
    ax.axhline(1 / CLASSES, color="grey", ls="--", label="chance")
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    conf = best["confusion"].float()
    ax2.imshow((conf / conf.sum(1, keepdim=True).clamp(min=1)).numpy(), cmap="Blues", vmin=0, vmax=1)
    ax2.set_xticks(range(CLASSES), labels, rotation=60, fontsize=8)
    ax2.set_yticks(range(CLASSES), labels, fontsize=8)
    ax2.set_xlabel("predicted")
    ax2.set_ylabel("true")
    ax2.set_title(f"{best['model']}: {best['accuracy']:.1%}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out, "classify.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")
    for r in results:
        r.pop("confusion")
    return {"results": results, "labels": labels, "chance": 1 / CLASSES, "table": "\n".join(lines),
            "files": [path]}


if __name__ == "__main__":
    main()
