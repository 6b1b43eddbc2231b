"""What to benchmark: the Case (one shape of one cell at one dtype and mode), the presets, the FLOP count.

FLOP count (`case_flops`), the convention of DeepBench and cuDNN's own reports: only the matrix products
count, 2 FLOPs per multiply-add; the pointwise gate math (a few dozen operations per hidden unit and step,
under 1% of the total at H >= 256) is left out.

    forward, per time step, per layer and direction:
        2 * B * G * H * I_l          input projection W_ih x      (G = 4 LSTM, 3 GRU, 1 RNN)
      + 2 * B * G * H * H_out        recurrence       W_hh h      (H_out = proj or H)
      + 2 * B * H_out * H            projection       W_hr r      (LSTM with proj_size only)
    I_l = I for layer 0, D * H_out above it (D = 2 when bidirectional).
    forward + backward = 3 x forward: each product above has two of the same size in the backward
    (the gradient of its input and the gradient of its weight).
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
MODES = ("fwd", "fwdbwd")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "half": "float16", "f16": "float16",
                 "bf16": "bfloat16", "fp64": "float64", "f64": "float64", "double": "float64",
                 "float": "float32"}


@dataclass(frozen=True)
class Shape:
    seq_len: int      # T
    batch: int        # B
    input_size: int   # I
    hidden: int       # H

    def __str__(self) -> str:
        return f"T{self.seq_len}-B{self.batch}-I{self.input_size}-H{self.hidden}"


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration; every provider runs it with the same weights and inputs."""

    cell: str
    shape: Shape
    dtype: str
    mode: str
    layers: int = 1
    bidirectional: bool = False

    @property
    def id(self) -> str:
        """Reads as the configuration: lstm-T25-B16-I512-H512-L1-float16-fwd."""
        bi = "-bi" if self.bidirectional else ""
        return f"{self.cell}-{self.shape}-L{self.layers}{bi}-{self.dtype}-{self.mode}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def fields(self) -> dict:
        d = asdict(self)
        d.update(d.pop("shape"))
        return d


def case_flops(case: Case, proj_size: int = 0) -> int:
    """Matrix-product FLOPs of one call (see the module doc)."""
    s = case.shape
    G = GATES[case.cell]
    H = s.hidden
    H_out = proj_size or H
    D = 2 if case.bidirectional else 1
    total = 0
    for layer in range(case.layers):
        I_l = s.input_size if layer == 0 else D * H_out
        per_step = 2 * s.batch * G * H * (I_l + H_out) + (2 * s.batch * H_out * H if proj_size else 0)
        total += D * s.seq_len * per_step
    return total * (3 if case.mode == "fwdbwd" else 1)


# ---------------------------------------------------------------------------------------------------------
# Presets: shapes per cell, and the run settings that suit them.
# ---------------------------------------------------------------------------------------------------------
def _grid(seq_lens, batches, hiddens, input_equals_hidden=True):
    return [Shape(t, b, h, h) for h, b, t in itertools.product(hiddens, batches, seq_lens)]


# DeepBench (Baidu) recurrent training and inference shapes, as ANCHORS.md summarises them; input size = H.
DEEPBENCH_LSTM_TRAIN = _grid([25], [16, 32, 64, 128], [512, 1024, 2048, 4096]) + _grid([150], [16, 32, 64], [256])
DEEPBENCH_LSTM_INFER = _grid([25], [1, 2, 4], [512, 1024, 2048]) + _grid([150], [1, 2, 4], [256])
# ANCHORS.md gives DeepBench's GRU set only as "H in {512..2816}, B up to 64, T up to 1500": this is a grid
# over that range at T=25, not DeepBench's exact list.
DEEPBENCH_GRU = _grid([25], [16, 32, 64], [512, 1024, 1536, 2048, 2560, 2816])
# The shape of the published cuDNN / FlashRNN comparison on H100 (ANCHORS.md): LSTM fp16, H=768, B=16, T=1024.
ANCHOR_LSTM = [Shape(1024, 16, 768, 768)]


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    cells: tuple[str, ...]
    shapes: dict          # cell -> list[Shape]; "*" for every cell not named
    modes: tuple[str, ...]
    warmup: int
    repeats: int
    max_seconds: float    # per provider and case: stop repeating once this much time was measured (>= 3 runs)

    def shapes_for(self, cell: str) -> list[Shape]:
        return list(self.shapes.get(cell, self.shapes.get("*", [])))


def _dedupe(shapes):
    return list(dict.fromkeys(shapes))


PRESETS = {
    # Sized for a 2-core CPU: about a minute for torch + the reference (see README); still a real grid
    # (3 batch sizes per hidden size, so the plot has lines).
    "quick": Preset(
        "quick", "small LSTM/GRU grid, T=16, H in {128, 256}, B in {1, 8, 32}: about a minute on 2 CPU cores",
        ("lstm", "gru"), {"*": _grid([16], [1, 8, 32], [128, 256])}, ("fwd", "fwdbwd"),
        warmup=2, repeats=10, max_seconds=0.5),
    "deepbench": Preset(
        "deepbench", "DeepBench LSTM training+inference shapes, a GRU grid, and the H100 anchor shape "
        "(LSTM T=1024 B=16 H=768); RNN cells on the LSTM training shapes",
        ("lstm", "gru"),
        {"lstm": _dedupe(DEEPBENCH_LSTM_TRAIN + DEEPBENCH_LSTM_INFER + ANCHOR_LSTM), "gru": DEEPBENCH_GRU,
         "*": DEEPBENCH_LSTM_TRAIN},
        ("fwd", "fwdbwd"), warmup=5, repeats=30, max_seconds=2.0),
    "full": Preset(
        "full", "every cell on the quick and deepbench shapes",
        CELLS,
        {"lstm": _dedupe(_grid([16], [1, 8, 32], [128, 256]) + DEEPBENCH_LSTM_TRAIN + DEEPBENCH_LSTM_INFER
                         + ANCHOR_LSTM),
         "gru": _dedupe(_grid([16], [1, 8, 32], [128, 256]) + DEEPBENCH_GRU),
         "*": _dedupe(_grid([16], [1, 8, 32], [128, 256]) + DEEPBENCH_LSTM_TRAIN + DEEPBENCH_LSTM_INFER)},
        ("fwd", "fwdbwd"), warmup=5, repeats=30, max_seconds=2.0),
    # The tests' preset: seconds, not minutes.
    # The dispatch table's grid (--tune): sizes a factor 4 apart, so that every call within 2x of one of
    # them finds its measurement (backends/table.py); T=1 is the cells' and decoders' single step.
    # (T=64 is left out at H=1024: ~2 s a call on 2 CPU cores, and T=16 already measures that size's
    # throughput regime; calls beyond 2x of every entry fall back to torch's kernels.)
    "tune": Preset(
        "tune", "the measured-dispatch grid (--tune): every cell, H in {64, 256, 1024}, B in {1, 16, 64}, "
        "T in {1, 16, 64} (T <= 16 at H=1024)", CELLS,
        {"*": _grid([1, 16, 64], [1, 16, 64], [64, 256]) + _grid([1, 16], [1, 16, 64], [1024])},
        ("fwd", "fwdbwd"), warmup=2, repeats=9, max_seconds=0.4),
    "tiny": Preset(
        "tiny", "two tiny shapes for tests and smoke runs", ("lstm",),
        {"*": [Shape(4, 2, 8, 8), Shape(4, 4, 8, 8)]}, ("fwd", "fwdbwd"), warmup=1, repeats=3, max_seconds=0.2),
}


def default_preset(device: torch.device) -> str:
    """quick on a CPU (minutes matter there), deepbench on a GPU."""
    return "deepbench" if device.type == "cuda" else "quick"


def default_dtype(device: torch.device) -> str:
    """float16 on a GPU (the dtype of the cuDNN anchors), float32 on a CPU."""
    return "float16" if device.type == "cuda" else "float32"
