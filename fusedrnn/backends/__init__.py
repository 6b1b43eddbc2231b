"""Backend registry and dispatch.

A backend is chosen per layer call: the setting (`use_backend(...)` > env FUSEDRNN_BACKEND > "auto") names
one backend, or "auto" walks the preference list of the device type and takes the first backend that is
available on the device and supports the call. Every refusal has a reason, logged on the "fusedrnn" logger
at DEBUG and collected by `explain(...)`. Naming a backend that cannot run the call raises
`BackendUnsupportedError` with its reason.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch

from .base import Backend, LayerCall, scoped_environ, workspace_width  # noqa: F401  (re-exported)
from .cpu import CpuBackend
from .cuda import CudaBackend
from .cuda_emu import CudaEmuBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

logger = logging.getLogger("fusedrnn")

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (CudaBackend(), TritonBackend(), CpuBackend(), ReferenceBackend(), CudaEmuBackend())
}
BACKEND_NAMES = tuple(BACKENDS)

# "auto" tries these in order. Triton on the CPU means the interpreter, cuda-emu the CUDA emulator: correct but
# slow, so never auto (only when named).
PREFERENCE = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}
DEFAULT_PREFERENCE = ("reference",)

_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fusedrnn_backend", default=None)
_recorder: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("fusedrnn_explain", default=None)


class BackendUnsupportedError(RuntimeError):
    """The requested backend cannot run this call; the message says why."""


def _check_name(name: str, source: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected 'auto' or one of {list(BACKEND_NAMES)}")
    return name


def current_backend() -> str:
    """The backend setting in force: use_backend(...), else $FUSEDRNN_BACKEND, else 'auto'."""
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get("FUSEDRNN_BACKEND", "auto").strip() or "auto", "FUSEDRNN_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the fusedrnn ops inside the block on backend `name` ('auto' restores the automatic choice)."""
    token = _override.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _override.reset(token)


def _as_device(device) -> torch.device:
    if isinstance(device, torch.Tensor):
        return device.device
    return torch.device(device)


def available_backends(device: Union[str, torch.device, torch.Tensor] = "cpu") -> list[str]:
    """Backends that can run on this device at all, in the order 'auto' tries them, then the rest."""
    dev = _as_device(device)
    order = list(PREFERENCE.get(dev.type, DEFAULT_PREFERENCE))
    order += [n for n in BACKEND_NAMES if n not in order]
    return [n for n in order if BACKENDS[n].unavailable_reason(dev) is None]


def refusal(backend: Backend, call: LayerCall) -> Optional[str]:
    """Why `backend` cannot run `call`, or None."""
    return backend.unavailable_reason(call.device) or backend.unsupported_reason(call)


@dataclass
class Decision:
    direction: str  # "forward" | "backward"
    call: str
    chosen: str
    refused: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.direction} {self.call}: {self.chosen}"]
        lines += [f"    skipped {name}: {why}" for name, why in self.refused]
        return "\n".join(lines)


def select_backend(call: LayerCall, direction: str = "forward") -> Backend:
    """The backend that runs `call` under the current setting (see module doc)."""
    setting = current_backend()
    if setting != "auto":
        backend = BACKENDS[setting]
        why = refusal(backend, call)
        if why is not None:
            raise BackendUnsupportedError(
                f"fusedrnn backend {setting!r} cannot run {call.describe()} ({direction}): {why}. "
                f"Use fusedrnn.use_backend('auto') to fall back automatically; available on "
                f"{call.device.type}: {available_backends(call.device)}")
        refused = []
    else:
        refused = []  # (name, why) of each backend skipped before the chosen one
        for name in PREFERENCE.get(call.device.type, DEFAULT_PREFERENCE):
            why = refusal(BACKENDS[name], call)
            if why is None:
                backend = BACKENDS[name]
                break
            refused.append((name, why))
        else:  # the reference runs on every device, so this is a bug in a preference list
            raise BackendUnsupportedError(f"no fusedrnn backend can run {call.describe()}: {refused}")

    record_decision(direction, call.describe, backend.name, refused)
    return backend


def record_decision(direction: str, describe, chosen: str, refused: list) -> None:
    """Logs / records one dispatch decision. `describe` is a callable giving the call's description:
    the Decision is built only when someone reads it (it cost ~7 us a call)."""
    record = _recorder.get()
    if record is not None or logger.isEnabledFor(logging.DEBUG):
        decision = Decision(direction, describe(), chosen, refused)
        logger.debug("%s", decision)
        if record is not None:
            record.append(decision)


class Explanation(list):
    """The dispatch decisions of one run, one per layer call; str() gives a readable report."""

    def __str__(self) -> str:
        return "\n".join(str(d) for d in self) if self else "(no fusedrnn layer op ran)"

    @property
    def backends(self) -> list[str]:
        return [d.chosen for d in self]


@contextlib.contextmanager
def recording_decisions() -> Iterator[Explanation]:
    decisions = Explanation()
    token = _recorder.set(decisions)
    try:
        yield decisions
    finally:
        _recorder.reset(token)


def explain(fn, *args, **kwargs) -> Explanation:
    """Runs `fn(*args, **kwargs)` (a module or any callable) once without autograd and returns which backend
    each fusedrnn layer call used and why the backends before it were skipped."""
    with recording_decisions() as decisions, torch.no_grad():
        fn(*args, **kwargs)
    return decisions
