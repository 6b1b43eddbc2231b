"""Who is benchmarked: torch.nn (the baseline), one provider per fusedrnn backend, and any test providers.

A provider turns the baseline torch.nn module of a case into a callable with torch.nn's forward signature
(`module(x, hx) -> (y, h_n)` or `(y, (h_n, c_n))`) that holds the same weights, and says in which context
every call, forward and backward, must run (a fusedrnn provider forces its backend there).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

import fusedrnn
from fusedrnn import backends as _backends

from .presets import Case

MakeFn = Callable[[Case, nn.Module], Callable]


@dataclass
class Provider:
    name: str                         # "torch", "fusedrnn:reference", ...
    label: str                        # for people: "torch.nn (cuDNN)"
    make: MakeFn                      # (case, baseline torch.nn module) -> callable like the module
    backend: Optional[str] = None     # the fusedrnn backend it forces, if any

    def context(self):
        return forced_backend(self.backend) if self.backend else contextlib.nullcontext()


@contextlib.contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """fusedrnn.use_backend(name), and $FUSEDRNN_BACKEND=name for the same span.

    use_backend is a context variable, which autograd's worker threads do not see: on CUDA the backward of
    a fusedrnn op runs on such a thread and would fall back to "auto". The environment variable is what
    fusedrnn.current_backend() reads there, so the backward runs on the named backend too."""
    old = os.environ.get("FUSEDRNN_BACKEND")
    os.environ["FUSEDRNN_BACKEND"] = name
    try:
        with fusedrnn.use_backend(name):
            yield
    finally:
        if old is None:
            os.environ.pop("FUSEDRNN_BACKEND", None)
        else:
            os.environ["FUSEDRNN_BACKEND"] = old


# ---------------------------------------------------------------------------------------------------------
# torch.nn: the baseline every other provider is checked against and compared with.
# ---------------------------------------------------------------------------------------------------------
def _module_args(case: Case):
    s = case.shape
    return (s.input_size, s.hidden), dict(num_layers=case.layers, bidirectional=case.bidirectional)


def make_torch_module(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The baseline torch.nn module of a case; `seed` fixes its weights (torch.nn's own initialisation)."""
    args, kwargs = _module_args(case)
    torch.manual_seed(seed)
    if case.cell == "lstm":
        m = nn.LSTM(*args, **kwargs, device=device, dtype=dtype)
    elif case.cell == "gru":
        m = nn.GRU(*args, **kwargs, device=device, dtype=dtype)
    else:
        m = nn.RNN(*args, nonlinearity=case.cell[4:], **kwargs, device=device, dtype=dtype)
    return m


def torch_label(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.nn (cuDNN)" if torch.backends.cudnn.is_available() else "torch.nn (CUDA, no cuDNN)"
    if device.type == "cpu":
        return "torch.nn (CPU: oneDNN)" if torch.backends.mkldnn.is_available() else "torch.nn (CPU: ATen)"
    return f"torch.nn ({device.type})"


def torch_provider(device: torch.device) -> Provider:
    return Provider("torch", torch_label(device), lambda case, module: module)


# ---------------------------------------------------------------------------------------------------------
# fusedrnn: one provider per backend, the drop-in module with the baseline's weights.
# ---------------------------------------------------------------------------------------------------------
def make_fusedrnn_module(case: Case, like: nn.Module) -> nn.Module:
    args, kwargs = _module_args(case)
    p = next(like.parameters())
    factory = dict(device=p.device, dtype=p.dtype)
    if case.cell == "lstm":
        m = fusedrnn.LSTM(*args, **kwargs, **factory)
    elif case.cell == "gru":
        m = fusedrnn.GRU(*args, **kwargs, **factory)
    else:
        m = fusedrnn.RNN(*args, nonlinearity=case.cell[4:], **kwargs, **factory)
    m.load_state_dict(like.state_dict())  # same names and shapes as torch.nn: strict load
    return m


def fusedrnn_provider(backend: str) -> Provider:
    label = "fusedrnn, automatic choice" if backend == "auto" else f"fusedrnn backend {backend!r}"
    return Provider(f"fusedrnn:{backend}", label,
                    lambda case, module: make_fusedrnn_module(case, module), backend=backend)


def auto_backends(device: torch.device) -> list[str]:
    """The backends benchmarked by default: those 'auto' may choose on this device and that are available,
    then 'auto' itself (what a user gets).

    Backends outside the device's preference list (Triton on a CPU, which is its interpreter) are left out
    unless named: they are not a speed anyone gets by default."""
    preferred = _backends.PREFERENCE.get(device.type, _backends.DEFAULT_PREFERENCE)
    return [b for b in fusedrnn.available_backends(device) if b in preferred] + ["auto"]


def tune_backends(device: torch.device) -> list[str]:
    """The backends a dispatch table measures: those 'auto' chooses among, but the reference (never fast)."""
    return [b for b in auto_backends(device) if b not in ("reference", "auto")]


def backend_problem(name: str, device: torch.device) -> Optional[str]:
    """None when `name` is a fusedrnn backend that can run on `device`, else a message saying why not."""
    if name == "auto":
        return None
    if name not in fusedrnn.BACKEND_NAMES:
        return f"unknown backend {name!r}; known: {', '.join(fusedrnn.BACKEND_NAMES)} (or 'all', 'default')"
    why = _backends.BACKENDS[name].unavailable_reason(device)
    if why is not None:
        return (f"backend {name!r} is not available on {device}: {why} "
                f"(available there: {', '.join(fusedrnn.available_backends(device))})")
    return None


# ---------------------------------------------------------------------------------------------------------
# Test hook: extra providers (e.g. a deliberately wrong one) that every run includes while registered.
# ---------------------------------------------------------------------------------------------------------
_EXTRA: dict[str, Provider] = {}


def register_provider(name: str, make: MakeFn, label: Optional[str] = None) -> Provider:
    """Adds a provider to every following run. `make(case, torch_module)` returns a callable with the
    module's forward signature. Returns the Provider; remove it with unregister_provider(name)."""
    if name == "torch" or name.startswith("fusedrnn:"):
        raise ValueError(f"provider name {name!r} is reserved")
    provider = Provider(name, label or name, make)
    _EXTRA[name] = provider
    return provider


def unregister_provider(name: str) -> None:
    _EXTRA.pop(name, None)


def extra_providers() -> list[Provider]:
    return list(_EXTRA.values())
