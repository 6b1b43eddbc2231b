"""Backend registry and dispatch.

A backend is chosen per layer call: the setting (`use_backend(...)` > env FUSEDRNN_BACKEND > "auto") names
one backend, or "auto" collects the backends of the device's preference list that can run the call and
picks among them by measurement (backends/table.py: the dispatch table of this device class; where nothing
was measured, torch's own kernels, backend "aten"). Every refusal has a reason, logged on the "fusedrnn"
logger at DEBUG and collected by `explain(...)`, with the reason for the choice. Naming a backend that cannot
run the call raises `BackendUnsupportedError` with its reason.

Where the call runs decides who may take it: eager calls (fusedrnn.functional) can run "aten" with torch's
autograd; inside the fusedrnn::rnn_layer op (torch.compile, export, jit.trace) "aten" takes only calls
without gradients, and the op's explicit backward never runs on it.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch

from . import table as dispatch_table
from .aten import AtenBackend
from .base import Backend, LayerCall, scoped_environ, workspace_width  # noqa: F401  (re-exported)
from .cpu import CpuBackend
from .cuda import CudaBackend
from .cuda_emu import CudaEmuBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

logger = logging.getLogger("fusedrnn")

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (CudaBackend(), TritonBackend(), CpuBackend(), AtenBackend(), ReferenceBackend(),
                        CudaEmuBackend())
}
BACKEND_NAMES = tuple(BACKENDS)

# The backends "auto" chooses among, in order of preference where measurements tie or are missing (after
# "aten", see backends/table.py). Triton on the CPU means the interpreter, cuda-emu the CUDA emulator:
# correct but slow, so never auto (only when named).
PREFERENCE = {
    "cuda": ("cuda", "triton", "aten", "reference"),
    "cpu": ("cpu", "aten", "reference"),
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


def auto_takes_cpu_kernel_for_lengths() -> bool:
    """Whether "auto" runs a variable-length CPU call on the cpu backend: no other fused backend that is
    available comes before it (select_backend takes the first fused one for lengths). The modules' in-place
    PackedSequence path runs the cpu kernel itself, so it asks this first."""
    cpu = torch.device("cpu")
    for name in PREFERENCE.get("cpu", DEFAULT_PREFERENCE):
        if name == "cpu":
            return True
        if name not in ("aten", "reference") and BACKENDS[name].unavailable_reason(cpu) is None:
            return False
    return False


def refusal(backend: Backend, call: LayerCall) -> Optional[str]:
    """Why `backend` cannot run `call`, or None."""
    return backend.unavailable_reason(call.device) or backend.unsupported_reason(call)


@dataclass
class Decision:
    direction: str  # "forward" | "backward"
    call: str
    chosen: str
    refused: list[tuple[str, str]] = field(default_factory=list)
    why: str = ""   # why `chosen` among those that could run it ("" for a named backend)

    def __str__(self) -> str:
        lines = [f"{self.direction} {self.call}: {self.chosen}" + (f" -- {self.why}" if self.why else "")]
        lines += [f"    skipped {name}: {why}" for name, why in self.refused]
        return "\n".join(lines)


_ATEN_NEEDS_EAGER = ("gradients are needed inside the fusedrnn op (torch.compile / export / jit.trace), where "
                     "fusedrnn's explicit backward runs: torch's kernels keep no fusedrnn workspace")


def _context_refusal(name: str, direction: str, need_workspace: bool, eager: bool) -> Optional[str]:
    if name == "aten" and (direction == "backward" or (need_workspace and not eager)):
        return _ATEN_NEEDS_EAGER
    return None


# Decisions of "auto" on plain CPU calls, by everything they depend on: the dispatch (~10 us of Python: the
# refusals, the table lookup) runs once per shape, not once per call -- a decoding loop calls a cell per
# token. The one refusal that reads values, aten's of a zero length, is part of the key (one comparison on
# the CPU lengths tensor): with it, `lengths=` calls hit the cache too (LSTM T=10 B=16 H=128: the refusals
# cost ~30 us of a ~1 ms call).
_auto_cache: dict = {}


def select_backend(call: LayerCall, direction: str = "forward", need_workspace: bool = False,
                   eager: bool = False) -> Backend:
    """The backend that runs `call` under the current setting (see module doc).

    direction: "forward" or "backward" (the op's explicit backward); need_workspace: the forward keeps
    what a backward needs (the call will be differentiated); eager: the caller runs "aten" itself with
    torch's autograd (fusedrnn.functional's plain eager path) rather than inside the op."""
    setting = current_backend()
    if setting != "auto":
        backend = BACKENDS[setting]
        why = refusal(backend, call) or _context_refusal(setting, direction, need_workspace, eager)
        if why is not None:
            raise BackendUnsupportedError(
                f"fusedrnn backend {setting!r} cannot run {call.describe()} ({direction}): {why}. "
                f"Use fusedrnn.use_backend('auto') to fall back automatically; available on "
                f"{call.device.type}: {available_backends(call.device)}")
        record_decision(direction, call.describe, backend.name, [])
        return backend
    dev = call.device
    preference = PREFERENCE.get(dev.type, DEFAULT_PREFERENCE)
    key = None
    if dev.type == "cpu" and not torch.compiler.is_compiling():
        w_hr, lengths = call.w_hr, call.lengths
        key = (preference, os.environ.get(dispatch_table.TABLE_ENV), call.cell, call.dtype, call.x.shape,
               call.w_hh.shape, None if w_hr is None else w_hr.shape, call.b_ih is None, call.reverse,
               direction, need_workspace, eager, None if lengths is None else bool((lengths == 0).any()))
        hit = _auto_cache.get(key)
        if hit is not None:
            name, refused, why = hit
            record_decision(direction, call.describe, name, refused, why)
            return BACKENDS[name]
    candidates, refused = [], []  # refused: (name, why) of each backend that cannot run the call
    for name in preference:
        why = refusal(BACKENDS[name], call) or _context_refusal(name, direction, need_workspace, eager)
        if why is None:
            candidates.append(name)
        else:
            refused.append((name, why))
    if not candidates:  # the reference runs on every device, so this is a bug in a preference list
        raise BackendUnsupportedError(f"no fusedrnn backend can run {call.describe()}: {refused}")
    if direction == "backward" or len(candidates) == 1:
        # The backward runs where the forward's workspace can be consumed: any fused backend (shared layout).
        name, why = candidates[0], ("the only one that can run it" if len(candidates) == 1 else
                                    "the first in the preference list that can run the backward")
    elif call.lengths is not None and any(n not in ("aten", "reference") for n in candidates):
        # The table measures padded calls. torch runs variable lengths as a PackedSequence, 5x-114x slower
        # than padded (pytorch #149194; here at T=70,000, B=2: aten over 4 minutes, cpu 0.2 s), while the
        # fused kernels take lengths at padded cost: the first fused backend that can run the call.
        name = next(n for n in candidates if n not in ("aten", "reference"))
        why = "variable lengths: torch's kernels would need a PackedSequence (up to ~100x slower than padded)"
    else:
        name, why = dispatch_table.choose(call.cell, call.dtype, "fwdbwd" if need_workspace else "fwd",
                                          call.hidden_size, call.batch_size, call.seq_len, dev, candidates)
    if key is not None:
        if len(_auto_cache) > 4096:
            _auto_cache.clear()
        _auto_cache[key] = (name, refused, why)
    record_decision(direction, call.describe, name, refused, why)
    return BACKENDS[name]


def record_decision(direction: str, describe, chosen: str, refused: list, why: str = "") -> None:
    """Logs / records one dispatch decision. `describe` is a callable giving the call's description:
    the Decision is built only when someone reads it (it cost ~7 us a call)."""
    record = _recorder.get()
    if record is not None or logger.isEnabledFor(logging.DEBUG):
        decision = Decision(direction, describe(), chosen, refused, why)
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
