"""Measured dispatch: which backend "auto" picks, from a table of benchmark results for this class of device.

A table is JSON written by `python -m fusedrnn.bench --tune` (fusedrnn/bench/tune.py):

    {"format": 1, "device_class": "cpu-avx2", "meta": {device, torch, commit, threads, ...},
     "entries": [{"cell": "lstm", "dtype": "float32", "mode": "fwd" | "fwdbwd", "H": 256, "B": 16, "T": 16,
                  "ms": {"aten": 1.92, "cpu": 1.31}}, ...]}

`mode` is "fwdbwd" for calls that will be differentiated (the op keeps a workspace), "fwd" otherwise. A call
matches the entry of its cell, dtype and mode that is nearest in log2(H), log2(B), log2(T), if that entry
is within a factor 2 in each (MATCH_LOG2_DISTANCE; a T past the longest measured counts as that one); among the backends that can run the call, the one with
the smallest measured time wins -- at a size that was not itself measured, a fused backend only with a lead
of INEXACT_MARGIN over aten there.

Where the table comes from: $FUSEDRNN_DISPATCH_TABLE (a file, e.g. your own --tune output) if set, else the
committed fusedrnn/dispatch_tables/<device_class>.json. A missing or corrupt file, or one measured on another
device class, gives one warning and the fallback.

Fallback, where no measurement applies: torch's own kernels (backend "aten") when they can run the call --
an unmeasured fused path is never assumed faster than cuDNN / oneDNN -- else the first backend of the
device's preference list that can.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

TABLE_ENV = "FUSEDRNN_DISPATCH_TABLE"
TABLE_DIR = Path(__file__).resolve().parent.parent / "dispatch_tables"
FORMAT = 1
MATCH_LOG2_DISTANCE = 1.0  # per size: an entry measured within 2x of the call's H, B and T applies
# Away from a measured size, a fused backend must have beaten aten there by this much: a lead measured at
# one size can shrink at the next (cpu-avx2, LSTM fwd B=64: 1.11x aten at H=256, 0.94x at H=512, T=25).
INEXACT_MARGIN = 1.15
FALLBACK = "aten"


class TableError(ValueError):
    """A dispatch table file that cannot be used; the message names the file and the problem."""


def device_class(device: torch.device) -> str:
    """'cpu-avx2' (the cpu backend's active ISA level), 'cuda-nvidia-h100-80gb-hbm3-132sm', ..."""
    if device.type == "cpu":
        try:
            return f"cpu-{torch.ops.fusedrnn.cpu_isa()}"
        except (AttributeError, RuntimeError):
            return "cpu-unknown"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        slug = re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-")
        return f"cuda-{slug}-{props.multi_processor_count}sm"
    return device.type


@dataclass(frozen=True)
class Entry:
    cell: str
    dtype: str
    mode: str
    H: int
    B: int
    T: int
    ms: dict  # backend -> median milliseconds of one module call


@dataclass
class Table:
    device_class: str
    meta: dict
    entries: list
    source: str

    def __post_init__(self):
        self._by_kind: dict = {}
        self._longest: dict = {}  # (cell, dtype, mode, H, B) -> the longest T measured there
        for e in self.entries:
            self._by_kind.setdefault((e.cell, e.dtype, e.mode), []).append(e)
            key = (e.cell, e.dtype, e.mode, e.H, e.B)
            self._longest[key] = max(self._longest.get(key, 0), e.T)

    def nearest(self, cell: str, dtype: str, mode: str, H: int, B: int, T: int) -> tuple[Optional[Entry], float]:
        """(the entry nearest in log2 sizes within MATCH_LOG2_DISTANCE each, its summed log2 distance).

        A T beyond the longest measured one is matched as that T: once the per-call overhead is amortised a
        step costs the same at any length (cpu-avx2, GRU H=128 B=16 fwd: cpu 2.4x torch.nn at T=100, 3.5x at
        T=1000; bench/bench_lengths.py), and such a match counts as inexact (INEXACT_MARGIN applies)."""
        best, best_distance = None, math.inf
        for e in self._by_kind.get((cell, dtype, mode), ()):
            T_match = min(T, self._longest[(cell, dtype, mode, e.H, e.B)])
            d = (abs(math.log2(H / e.H)), abs(math.log2(B / e.B)), abs(math.log2(T_match / e.T)))
            if max(d) <= MATCH_LOG2_DISTANCE:
                distance = sum(d) + math.log2(T / T_match)  # > 0: an extrapolated T is inexact
                if distance < best_distance:
                    best, best_distance = e, distance
        return best, best_distance

    def to_json(self) -> dict:
        return {"format": FORMAT, "device_class": self.device_class, "meta": self.meta,
                "entries": [{"cell": e.cell, "dtype": e.dtype, "mode": e.mode, "H": e.H, "B": e.B, "T": e.T,
                             "ms": e.ms} for e in self.entries]}


def parse_table(data, source: str) -> Table:
    """A Table from parsed JSON; TableError naming `source` and the problem if it is not one."""
    if not isinstance(data, dict):
        raise TableError(f"dispatch table {source}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise TableError(f"dispatch table {source}: expected \"format\": {FORMAT}, got {data.get('format')!r}")
    if not isinstance(data.get("device_class"), str):
        raise TableError(f"dispatch table {source}: \"device_class\" must be a string")
    entries = []
    for i, raw in enumerate(data.get("entries", None) or []):
        try:
            e = Entry(str(raw["cell"]), str(raw["dtype"]), str(raw["mode"]), int(raw["H"]), int(raw["B"]),
                      int(raw["T"]), {str(k): float(v) for k, v in raw["ms"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise TableError(f"dispatch table {source}: entry {i} is malformed ({type(err).__name__}: {err})") \
                from None
        if min(e.H, e.B, e.T) <= 0 or e.mode not in ("fwd", "fwdbwd") or not e.ms or \
                not all(v > 0 and math.isfinite(v) for v in e.ms.values()):
            raise TableError(f"dispatch table {source}: entry {i} has a non-positive size, an unknown mode or "
                             f"no positive finite times: {raw}")
        entries.append(e)
    if not entries:
        raise TableError(f"dispatch table {source}: no entries")
    return Table(data["device_class"], dict(data.get("meta") or {}), entries, source)


def load_table(path) -> Table:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise TableError(f"dispatch table {path}: cannot be read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise TableError(f"dispatch table {path}: not valid JSON ({e})") from None
    return parse_table(data, str(path))


_loaded: dict = {}   # (env value, device class) -> Table or None
_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def active_table(device: torch.device) -> Optional[Table]:
    """The table "auto" reads for this device (see the module doc), or None; loaded once per file."""
    env = os.environ.get(TABLE_ENV) or None
    key = (env, device.type, device.index)
    if key in _loaded:
        return _loaded[key]
    dc = device_class(device)
    table = None
    if env is not None:
        try:
            table = load_table(env)
        except TableError as e:
            _warn_once(f"{e}; {TABLE_ENV} is ignored, and auto uses the committed table of {dc} if any")
        if table is not None and table.device_class != dc:
            _warn_once(f"dispatch table {env} was measured on {table.device_class}, this device is {dc}: it is "
                       f"ignored (tune this machine: python -m fusedrnn.bench --tune)")
            table = None
    if table is None:
        committed = TABLE_DIR / f"{dc}.json"
        if committed.exists():
            try:
                table = load_table(committed)
            except TableError as e:
                _warn_once(f"{e}; auto falls back to {FALLBACK}")
    _loaded[key] = table
    return table


def forget_tables() -> None:
    """Reload tables at the next call (after changing $FUSEDRNN_DISPATCH_TABLE or the files)."""
    _loaded.clear()
    _warned.clear()


def choose(cell: str, dtype: torch.dtype, mode: str, H: int, B: int, T: int, device: torch.device,
           candidates: list) -> tuple[str, str]:
    """(backend, why) among `candidates` (names that can run the call, in preference order)."""
    table = active_table(device)
    dtype_name = str(dtype).replace("torch.", "")
    entry, distance = table.nearest(cell, dtype_name, mode, H, B, T) if table is not None else (None, 0.0)
    if entry is not None:
        timed = [(entry.ms[n], n) for n in candidates if n in entry.ms]
        if timed:
            ms, name = min(timed)
            if name != FALLBACK and FALLBACK in entry.ms and FALLBACK in candidates and distance > 0 and \
                    entry.ms[FALLBACK] < INEXACT_MARGIN * ms:
                return FALLBACK, (f"{name} measured only {entry.ms[FALLBACK] / ms:.2f}x {FALLBACK} at {cell} "
                                  f"{dtype_name} {mode} H={entry.H} B={entry.B} T={entry.T}, not this size: under "
                                  f"the {INEXACT_MARGIN}x margin for an inexact match (table "
                                  f"{Path(table.source).name})")
            if name != FALLBACK and FALLBACK in entry.ms:
                versus = f"measured {entry.ms[FALLBACK] / ms:.2f}x {FALLBACK}"
            elif len(timed) > 1:
                runner_up_ms, runner_up = sorted(timed)[1]
                versus = f"measured fastest ({runner_up} {runner_up_ms / ms:.2f}x slower)"
            else:
                versus = "the only one measured"
            return name, (f"{versus} at {cell} {dtype_name} {mode} H={entry.H} B={entry.B} T={entry.T} "
                          f"on {table.device_class} (table {Path(table.source).name})")
    where = "no dispatch table for " + device_class(device) if table is None else \
        f"no measurement near {cell} {dtype_name} {mode} H={H} B={B} T={T} in {Path(table.source).name}"
    name = FALLBACK if FALLBACK in candidates else candidates[0]
    return name, f"{where}: {name}"
