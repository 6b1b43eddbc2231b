"""Correctness before timing: every provider's outputs (and, in fwdbwd mode, gradients) against torch.nn.

The rule is the test suite's (tests/helpers.py, after flash-attention): torch.nn is run once more on the
same weights and inputs upcast to float64, and a provider's max error against that float64 result may be at
most FACTOR times torch.nn's own error at the benchmarked dtype, plus a floor of a few units in the last
place of the dtype (relative to max(1, |reference|)) for values torch.nn happens to get exactly right.
So a provider passes when it is about as accurate as torch.nn itself -- on cuDNN in float32 that includes
TF32's error when cuDNN uses it -- and fails on any real bug, which is far larger.

Compared: y, h_n, c_n; with fwdbwd also the gradients of x, h0, c0 and of every parameter, by name.
The same `step` function runs the check and the timed calls, so what is checked is what is timed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .presets import Case

FACTOR = 2.0
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4 * 2.0 ** -10,
         torch.bfloat16: 4 * 2.0 ** -7}


@dataclass
class Inputs:
    x: Tensor
    h0: Tensor
    c0: Optional[Tensor]
    cotangents: list[Tensor]            # for y, h_n (, c_n)
    needs_grad: bool

    @property
    def hx(self):
        return (self.h0, self.c0) if self.c0 is not None else self.h0

    def leaves(self) -> dict[str, Tensor]:
        d = {"x": self.x, "h0": self.h0}
        if self.c0 is not None:
            d["c0"] = self.c0
        return d

    def to(self, dtype: torch.dtype) -> "Inputs":
        cast = lambda t: None if t is None else t.detach().to(dtype).requires_grad_(self.needs_grad)  # noqa
        return Inputs(cast(self.x), cast(self.h0), cast(self.c0), [c.to(dtype) for c in self.cotangents],
                      self.needs_grad)


def make_inputs(case: Case, device: torch.device, seed: int = 1) -> Inputs:
    """Random inputs ~ N(0, 1), initial states ~ N(0, 0.25), cotangents ~ N(0, 1), at the case's dtype."""
    s = case.shape
    g = torch.Generator().manual_seed(seed)
    dtype = case.torch_dtype
    D = 2 if case.bidirectional else 1
    n = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)  # noqa
    x = n(s.seq_len, s.batch, s.input_size)
    h0 = n(case.layers * D, s.batch, s.hidden) * 0.5
    c0 = n(case.layers * D, s.batch, s.hidden) * 0.5 if case.cell == "lstm" else None
    cot = [n(s.seq_len, s.batch, D * s.hidden), n(case.layers * D, s.batch, s.hidden)]
    if c0 is not None:
        cot.append(n(case.layers * D, s.batch, s.hidden))
    needs_grad = case.mode == "fwdbwd"
    for t in (x, h0, c0):
        if t is not None:
            t.requires_grad_(needs_grad)
    return Inputs(x, h0, c0, cot, needs_grad)


def _outputs(out) -> list[Tensor]:
    y, hidden = out
    return [y] + (list(hidden) if isinstance(hidden, (tuple, list)) else [hidden])


def parameters_of(fn) -> dict[str, Tensor]:
    return dict(fn.named_parameters()) if isinstance(fn, nn.Module) else {}


def make_step(fn: Callable, inputs: Inputs, mode: str) -> Callable[[], list[Tensor]]:
    """The unit that is checked and timed: forward under no_grad ("fwd"), or forward + backward of all
    outputs with fixed cotangents, gradients written to .grad afresh each call ("fwdbwd")."""
    params = list(parameters_of(fn).values())
    leaves = list(inputs.leaves().values())

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return _outputs(fn(inputs.x, inputs.hx))
        return step

    def step():
        for t in leaves + params:
            t.grad = None
        outs = _outputs(fn(inputs.x, inputs.hx))
        torch.autograd.backward(outs, inputs.cotangents[:len(outs)])
        return outs
    return step


def collect(fn, inputs: Inputs, outs: list[Tensor], mode: str) -> dict[str, Tensor]:
    """Named results of one step: outputs, and in fwdbwd the gradients of inputs and parameters."""
    names = ["y", "h_n", "c_n"]
    res = {names[i]: o.detach() for i, o in enumerate(outs)}
    if mode == "fwdbwd":
        for name, t in list(inputs.leaves().items()) + list(parameters_of(fn).items()):
            res[f"grad_{name}"] = t.grad
    return res


def reference_module(module: nn.Module) -> nn.Module:
    """The baseline module with its weights upcast, exactly, to float64."""
    return copy.deepcopy(module).to(torch.float64)


@dataclass
class Verdict:
    ok: bool
    worst: str = ""                  # the tensor closest to (or furthest over) its tolerance
    worst_ratio: float = 0.0         # its error / tolerance (> 1 is WRONG)
    detail: str = ""
    errors: dict = field(default_factory=dict)  # name -> (error, tolerance)


def max_abs_error(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    diff = (a.detach().double() - b.detach().double()).abs()
    if not torch.isfinite(diff).all():
        return float("inf")
    return diff.max().item()


def judge(results: dict, baseline: dict, ref64: dict, dtype: torch.dtype) -> Verdict:
    """Compares a provider's named results with the float64 reference; baseline = torch.nn at `dtype`."""
    errors = {}
    worst, worst_ratio, problems = "", 0.0, []
    for name, ref in ref64.items():
        if ref is None:
            continue
        got = results.get(name)
        if got is None:
            problems.append(f"{name} missing")
            worst, worst_ratio = name, float("inf")
            continue
        if tuple(got.shape) != tuple(ref.shape):
            problems.append(f"{name} shape {list(got.shape)} != {list(ref.shape)}")
            worst, worst_ratio = name, float("inf")
            continue
        scale = ref.abs().max().item() if ref.numel() else 1.0
        native = max_abs_error(baseline[name], ref) if baseline.get(name) is not None else 0.0
        native = 0.0 if native == float("inf") else native
        tol = FACTOR * native + FLOOR[dtype] * max(1.0, scale)
        err = max_abs_error(got, ref)
        errors[name] = (err, tol)
        ratio = err / tol if tol > 0 else (0.0 if err == 0 else float("inf"))
        if ratio > worst_ratio or not worst:
            worst, worst_ratio = name, ratio
        if ratio > 1:
            problems.append(f"{name}: max error {err:.3g} > tolerance {tol:.3g}")
    if problems:
        return Verdict(False, worst, worst_ratio, "; ".join(problems), errors)
    return Verdict(True, worst, worst_ratio, f"worst {worst}: {worst_ratio:.2f} of tolerance", errors)
