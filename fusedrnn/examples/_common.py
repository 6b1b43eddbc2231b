"""Helpers shared by the examples: device, output folder, a stderr progress bar, matplotlib."""
from __future__ import annotations

import os
import sys
import time

import torch

DEFAULT_OUT = "examples-out"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def out_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


class Progress:
    """A one-line stderr bar: `update(n, **metrics)`; redraws at most ~10 times a second."""

    def __init__(self, total: int, label: str = "", width: int = 30, stream=None) -> None:
        # sys.stderr looked up now, not at import: it may have been replaced since (pytest's capture)
        self.total, self.label, self.width = max(1, total), label, width
        self.stream = sys.stderr if stream is None else stream
        self.start = self.last = time.perf_counter()
        self.metrics: dict = {}

    def update(self, n: int, **metrics) -> None:
        self.metrics.update(metrics)
        now = time.perf_counter()
        if now - self.last < 0.1 and n < self.total:
            return
        self.last = now
        done = int(self.width * n / self.total)
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.metrics.items())
        self.stream.write(f"\r{self.label} [{'#' * done}{'.' * (self.width - done)}] {n}/{self.total} "
                          f"{now - self.start:.0f}s {extra}\033[K")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
