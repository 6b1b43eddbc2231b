"""LSTM autoencoder on synthetic multichannel signals: reconstruction, denoising, anomaly detection.

An encoder fusedrnn.LSTM reads the whole sequence; its final (h, c) goes through a --code-sized bottleneck
(the fixed code); a decoder LSTM started from the code rebuilds the sequence (Srivastava et al., 2015). The
conditioned decoder's input is the previous frame: the true one while training (teacher forcing, one fused
call), its own previous output at test time (free-running, step by step); the unconditioned decoder's input
is the code at every step (Keras' RepeatVector), so it runs free from the start and everything must pass
through the code. A third model (denoising) is the unconditioned one trained on noisy inputs against clean
targets. Each signal: --channels harmonics of one base frequency (1.5-3.5
cycles per window), random phase and amplitudes, a little noise. Anomaly detection scores held-out sequences
by the unconditioned model's reconstruction error: normal ones against out-of-distribution ones (a base
frequency above the training range; a channel that goes flat for a while), ROC AUC.

    python -m fusedrnn.examples.autoencoder                             # the real run
    python -m fusedrnn.examples.autoencoder --steps 100 --hidden 32     # tiny
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import fusedrnn

from ._common import DEFAULT_OUT, Progress, device, out_dir, pyplot


def signals(n: int, length: int, channels: int, gen: torch.Generator, freq=(1.5, 3.5), noise: float = 0.05,
            flat: bool = False) -> torch.Tensor:
    """-> [n, T, C]: channel c is harmonic c+1 of a base frequency in `freq` (cycles per window)."""
    t = torch.arange(length, dtype=torch.float32) / length
    f = freq[0] + (freq[1] - freq[0]) * torch.rand(n, 1, 1, generator=gen)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=gen)
    k = torch.arange(1, channels + 1, dtype=torch.float32)
    amp = (0.5 + 0.5 * torch.rand(n, 1, channels, generator=gen)) / k.sqrt()
    x = amp * torch.sin(2 * math.pi * f * k * t[None, :, None] + k * phase)
    if flat:  # one channel stuck at its current value for a quarter of the window
        width = length // 4
        for i in range(n):
            c = int(torch.randint(0, channels, (1,), generator=gen))
            s = int(torch.randint(length // 8, length - width, (1,), generator=gen))
            x[i, s:s + width, c] = x[i, s, c]
    return x + noise * torch.randn(x.shape, generator=gen)


class LSTMAutoencoder(nn.Module):
    def __init__(self, channels: int, hidden: int, code: int) -> None:
        super().__init__()
        self.encoder = fusedrnn.LSTM(channels, hidden, batch_first=True)
        self.to_code = nn.Linear(2 * hidden, code)
        self.from_code = nn.Linear(code, 2 * hidden)
        self.decoder = fusedrnn.LSTM(channels + code, hidden, batch_first=True)
        self.out = nn.Linear(hidden, channels)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, c) = self.encoder(x)
        return self.to_code(torch.cat([h[-1], c[-1]], -1))  # the fixed-size code [B, code]

    def _start(self, code: torch.Tensor):
        h, c = torch.tanh(self.from_code(code)).chunk(2, -1)
        return h[None].contiguous(), c[None].contiguous()

    def decode_teacher_forced(self, code: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Every step sees the true previous frame: one fused call over the whole sequence."""
        prev = torch.cat([torch.zeros_like(target[:, :1]), target[:, :-1]], 1)
        y, _ = self.decoder(torch.cat([prev, torch.zeros(*prev.shape[:2], code.shape[1], device=prev.device)], -1),
                            self._start(code))
        return self.out(y)

    def decode_free_running(self, code: torch.Tensor, length: int) -> torch.Tensor:
        """Every step sees the decoder's own previous output: one step at a time."""
        state = self._start(code)
        frame = torch.zeros(code.shape[0], 1, self.out.out_features, device=code.device)
        frames = []
        blank = torch.zeros(code.shape[0], 1, code.shape[1], device=code.device)
        for _ in range(length):
            y, state = self.decoder(torch.cat([frame, blank], -1), state)
            frame = self.out(y)
            frames.append(frame)
        return torch.cat(frames, 1)

    def decode_unconditioned(self, code: torch.Tensor, length: int) -> torch.Tensor:
        """Every step sees the code and nothing else: one fused call."""
        frames = torch.zeros(code.shape[0], length, self.out.out_features, device=code.device)
        y, _ = self.decoder(torch.cat([frames, code[:, None].expand(-1, length, -1)], -1), self._start(code))
        return self.out(y)

    def forward(self, x: torch.Tensor, mode: str, target: torch.Tensor | None = None) -> torch.Tensor:
        code = self.encode(x)
        if mode == "unconditioned":
            return self.decode_unconditioned(code, x.shape[1])
        if mode == "teacher":
            return self.decode_teacher_forced(code, x if target is None else target)
        return self.decode_free_running(code, x.shape[1])


def train(name: str, mode: str, noisy: float, args, dev) -> tuple[LSTMAutoencoder, float]:
    torch.manual_seed(args.seed)
    model = LSTMAutoencoder(args.channels, args.hidden, args.code).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    bar = Progress(args.steps, f"{name:<14}")
    t0, loss_avg = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        clean = signals(args.batch, args.length, args.channels, gen).to(dev)
        x = clean + noisy * torch.randn(clean.shape, generator=gen).to(dev) if noisy else clean
        # the teacher-forced decoder reads the clean previous frame; the input (encoder) may be noisy
        loss = F.mse_loss(model(x, mode, target=clean), clean)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        bar.update(step, mse=loss_avg)
    bar.close()
    return model.eval(), time.perf_counter() - t0


@torch.no_grad()
def per_sequence_mse(model, x: torch.Tensor, mode: str, dev, target: torch.Tensor | None = None) -> torch.Tensor:
    target = x if target is None else target
    out = torch.cat([model(x[i:i + 256].to(dev), mode, target=target[i:i + 256].to(dev)).cpu()
                     for i in range(0, x.shape[0], 256)])
    return ((out - target) ** 2).mean((1, 2))


def roc_auc(normal: torch.Tensor, anomalous: torch.Tensor) -> float:
    """P(score of an anomalous sequence > score of a normal one), ties counted half (Mann-Whitney U)."""
    scores = torch.cat([normal, anomalous])
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    for v in scores.unique():  # average ranks of ties
        tie = scores == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    n0, n1 = len(normal), len(anomalous)
    return float((ranks[n0:].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--length", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--code", type=int, default=8, help="bottleneck size")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--noise", type=float, default=0.3, help="the denoising model's input noise (std)")
    ap.add_argument("--test-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(DEFAULT_OUT, "autoencoder"))
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    dev = device()
    out = out_dir(args.out)
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    test = signals(args.test_size, args.length, args.channels, gen)
    noisy_test = test + args.noise * torch.randn(test.shape, generator=gen)
    ood = {"higher frequency": signals(args.test_size, args.length, args.channels, gen, freq=(4.5, 6.0)),
           "flat channel": signals(args.test_size, args.length, args.channels, gen, flat=True)}
    mean_frame = signals(4096, args.length, args.channels, torch.Generator().manual_seed(1)).mean(0)
    mean_mse = ((test - mean_frame) ** 2).mean().item()
    print(f"autoencoder: {args.channels} channels x {args.length} steps, LSTM {args.hidden}, code {args.code}, "
          f"{args.steps} steps of {args.batch}, device {dev}; mean predictor MSE {mean_mse:.4f}")

    t0 = time.perf_counter()
    models = {"conditioned": train("conditioned", "teacher", 0.0, args, dev),
              "unconditioned": train("unconditioned", "unconditioned", 0.0, args, dev),
              "denoising": train("denoising", "unconditioned", args.noise, args, dev)}
    cond, uncond, dn_model = (models[k][0] for k in ("conditioned", "unconditioned", "denoising"))
    mse = {"conditioned, teacher-forced": per_sequence_mse(cond, test, "teacher", dev).mean().item(),
           "conditioned, free-running": per_sequence_mse(cond, test, "free", dev).mean().item(),
           "unconditioned (code only)": per_sequence_mse(uncond, test, "unconditioned", dev).mean().item()}
    lines = ["| decoder | held-out MSE | / mean predictor's |", "|---|---:|---:|"]
    lines += [f"| {n} | {m:.4f} | {m / mean_mse:.3f} |" for n, m in mse.items()]
    lines.append(f"| mean predictor (per step and channel) | {mean_mse:.4f} | 1 |")
    print("\n".join(lines))

    noisy_in = ((noisy_test - test) ** 2).mean().item()
    plain_dn = per_sequence_mse(uncond, noisy_test, "unconditioned", dev, target=test).mean().item()
    dn = per_sequence_mse(dn_model, noisy_test, "unconditioned", dev, target=test).mean().item()
    dn_lines = [f"| noisy input (std {args.noise}) | MSE against the clean signal |", "|---|---:|",
                f"| the noisy input itself | {noisy_in:.4f} |",
                f"| unconditioned autoencoder (trained on clean) | {plain_dn:.4f} |",
                f"| denoising autoencoder (trained noisy -> clean) | {dn:.4f} |"]
    print("\n".join(dn_lines))

    normal_scores = per_sequence_mse(uncond, test, "unconditioned", dev)
    ood_scores = {kind: per_sequence_mse(uncond, x, "unconditioned", dev) for kind, x in ood.items()}
    auc = {kind: roc_auc(normal_scores, sc) for kind, sc in ood_scores.items()}
    ad_lines = ["| anomaly (score: the unconditioned model's reconstruction MSE) | ROC AUC |", "|---|---:|"]
    ad_lines += [f"| {kind} | {a:.3f} |" for kind, a in auc.items()]
    print("\n".join(ad_lines))
    print(f"training {', '.join(f'{k} {v[1]:.0f}s' for k, v in models.items())}; total {time.perf_counter() - t0:.0f}s")

    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    with torch.no_grad():
        rec_tf = cond(test[:3].to(dev), "free").cpu()
        rec_fr = uncond(test[:3].to(dev), "unconditioned").cpu()
        rec_dn = dn_model(noisy_test[:1].to(dev), "unconditioned").cpu()
        rec_ood = uncond(ood["flat channel"][:1].to(dev), "unconditioned").cpu()
    colors = ["C0", "C1", "C2", "C3", "C4", "C5"]
    for j in range(3):
        ax = axes[0, j]
        for c in range(args.channels):
            ax.plot(test[j, :, c], color=colors[c % 6], lw=1.5)
            ax.plot(rec_fr[j, :, c], color=colors[c % 6], ls="--", lw=1.2)
            ax.plot(rec_tf[j, :, c], color=colors[c % 6], ls=":", lw=1)
        ax.set_title(f"held-out {j}: true (solid), unconditioned (dashed),\nconditioned, free-running (dotted)",
                     fontsize=8)
    ax = axes[1, 0]
    for c in range(args.channels):
        ax.plot(noisy_test[0, :, c], color=colors[c % 6], lw=0.6, alpha=0.5)
        ax.plot(test[0, :, c], color=colors[c % 6], lw=1.5)
        ax.plot(rec_dn[0, :, c], color=colors[c % 6], ls="--", lw=1.2)
    ax.set_title("denoising: noisy input (thin), clean (solid), output (dashed)", fontsize=8)
    ax = axes[1, 1]
    for c in range(args.channels):
        ax.plot(ood["flat channel"][0, :, c], color=colors[c % 6], lw=1.5)
        ax.plot(rec_ood[0, :, c], color=colors[c % 6], ls="--", lw=1.2)
    ax.set_title("anomaly (a flat channel): input (solid), reconstruction (dashed)", fontsize=8)
    ax = axes[1, 2]
    bins = torch.logspace(math.log10(max(1e-5, normal_scores.min().item())), 0, 40).numpy()
    ax.hist(normal_scores.numpy(), bins=bins, alpha=0.6, label="normal")
    for kind, sc in ood_scores.items():
        ax.hist(sc.numpy(), bins=bins, alpha=0.6,
                label=f"{kind} (AUC {auc[kind]:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("reconstruction MSE")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "autoencoder.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")
    return {"mse": mse, "mean_mse": mean_mse,
            "denoising": {"noisy_input": noisy_in, "plain": plain_dn, "denoising": dn}, "auc": auc,
            "table": "\n".join(lines + dn_lines + ad_lines), "files": [path]}


if __name__ == "__main__":
    main()
