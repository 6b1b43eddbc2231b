"""What a run leaves: the environment record, the table, results.json, results.csv, speedup.png, progress.

Every row carries the environment (device, torch, CUDA, cuDNN, commit, fusedrnn version), so rows from
different runs can be concatenated and still say where they came from.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from typing import Optional

import torch

import fusedrnn

ROW_FIELDS = [
    "case", "cell", "seq_len", "batch", "input_size", "hidden", "layers", "bidirectional", "dtype", "mode",
    "provider", "provider_label", "backend", "status", "median_ms", "p20_ms", "p80_ms", "min_ms", "n_timed",
    "per_step_us", "seq_per_s", "flops", "tflops", "peak_mem_mb", "mem_method", "speedup_vs_torch",
    "err_ratio", "detail",
    "device", "device_name", "torch_version", "cuda_version", "cudnn_version", "triton_version",
    "fusedrnn_version", "commit", "git_dirty", "threads", "load_avg", "python", "timestamp",
]


# ---------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------
def _git(*args) -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(fusedrnn.__file__)))
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> tuple[str, Optional[bool]]:
    """(commit of the fusedrnn source tree, whether tracked files differ from it); ("unknown", None) outside
    a git checkout unless $FUSEDRNN_COMMIT names it (the GPU suite passes it to machines without .git)."""
    commit = _git("rev-parse", "HEAD")
    if commit:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return commit, (bool(dirty) if dirty is not None else None)
    return os.environ.get("FUSEDRNN_COMMIT", "").strip() or "unknown", None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def load_average() -> str:
    """The machine's 1/5/15-minute load average: on a shared CPU, the context every CPU timing needs."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except (OSError, AttributeError):
        return "n/a"


def _cpu_isa() -> str:
    """fusedrnn's cpu kernel level and torch's ATen level, e.g. 'fusedrnn avx2, torch AVX2'."""
    ours = torch.ops.fusedrnn.cpu_isa() if fusedrnn.extension_error() is None else "n/a (no extension)"
    return f"fusedrnn {ours}, torch {torch.backends.cpu.get_cpu_capability()}"


def environment(device: torch.device) -> dict:
    commit, dirty = git_commit()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "device": str(device), "device_name": name, "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "none", "cudnn_version": str(cudnn) if cudnn else "none",
        "triton_version": _version("triton"), "fusedrnn_version": fusedrnn.__version__, "commit": commit,
        "git_dirty": dirty, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "load_avg": load_average(), **({"cpu_isa": _cpu_isa()} if device.type == "cpu" else {}),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------
def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    os.replace(tmp, path)  # a run killed mid-write leaves the previous complete file


def write_csv(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore", restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    os.replace(tmp, path)


def _parse_cell(v: str):
    if v == "":
        return None
    if v in ("True", "False"):
        return v == "True"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def read_rows(path: str) -> tuple[dict, list[dict]]:
    """(meta, rows) of a results.json or results.csv."""
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        return data.get("meta", {}), data["rows"]
    with open(path, newline="") as f:
        rows = [{k: _parse_cell(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return {}, rows


# ---------------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------------
def _fmt(v, spec: str) -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _si(v) -> str:
    if v is None or v == "":
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def format_table(rows: list[dict]) -> str:
    head = ["case", "provider", "status", "median ms", "p20-p80 ms", "us/step", "seq/s", "TFLOP/s",
            "peak MiB", "vs torch"]
    body = []
    for r in rows:
        status = r["status"]
        if status == "OK":
            cells = [_fmt(r.get("median_ms"), ".3f"),
                     f"{_fmt(r.get('p20_ms'), '.3f')}-{_fmt(r.get('p80_ms'), '.3f')}",
                     _fmt(r.get("per_step_us"), ".1f"), _si(r.get("seq_per_s")), _fmt(r.get("tflops"), ".3g"),
                     _fmt(r.get("peak_mem_mb"), ".1f"),
                     (_fmt(r.get("speedup_vs_torch"), ".2f") + "x") if r.get("speedup_vs_torch") else "-"]
        else:
            cells = ["-"] * 7
        body.append([r["case"], r["provider"], status] + cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    right = set(range(3, len(head)))

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head), "  ".join("-" * w for w in widths)]
    last_case = None
    for cells in body:
        if last_case is not None and cells[0] != last_case:
            out.append("")
        shown = list(cells)
        if cells[0] == last_case:
            shown[0] = ""
        last_case = cells[0]
        out.append(line(shown))
    notes = [f"  {r['provider']} on {r['case']}: {r['status']}: {r.get('detail', '')}"
             for r in rows if r["status"] != "OK"]
    if notes:
        out += ["", "Not timed:"] + notes
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# Plot: speedup over torch.nn vs batch size, one line per hidden size
# ---------------------------------------------------------------------------------------------------------
def plot_speedup(path: str, rows: list[dict], title: str = "") -> Optional[str]:
    """Writes the PNG; returns None, or why no plot was written (matplotlib missing, nothing to plot)."""
    points = [r for r in rows if r.get("status") == "OK" and r.get("provider") != "torch"
              and r.get("speedup_vs_torch")]
    if not points:
        return "nothing to plot: no provider other than torch.nn has a timed result"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the 'bench' extra): plot skipped"

    panels: dict = {}
    for r in points:
        key = (r["provider"], r["cell"], r["mode"], r["dtype"], r["layers"], r["bidirectional"])
        line = (r["hidden"], r["input_size"], r["seq_len"])
        panels.setdefault(key, {}).setdefault(line, []).append((r["batch"], r["speedup_vs_torch"]))
    providers = sorted({k[0] for k in panels})
    configs = sorted({k[1:] for k in panels})
    ncols, nrows = len(providers), len(configs)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.9 * nrows), squeeze=False)
    for i, conf in enumerate(configs):
        for j, prov in enumerate(providers):
            ax = axes[i][j]
            lines = panels.get((prov,) + conf)
            cell, mode, dtype, layers, bi = conf
            ax.set_title(f"{prov}: {cell} {mode} {dtype}" + (f" L{layers}" if layers != 1 else "")
                         + (" bi" if bi else ""), fontsize=8)
            if not lines:
                ax.set_axis_off()
                continue
            for (H, I, T), pts in sorted(lines.items()):
                pts.sort()
                label = f"H={H}" + (f" I={I}" if I != H else "") + f" T={T}"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, linewidth=1,
                        label=label)
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
            batches = sorted({b for pts in lines.values() for b, _ in pts})
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_yscale("log", base=2)  # 2x faster and 2x slower are the same distance from 1
            ys = [v for pts in lines.values() for _, v in pts] + [1.0]
            lo, hi = math.floor(2 * math.log2(min(ys))), math.ceil(2 * math.log2(max(ys)))
            step = max(1, (hi - lo) // 8)
            ax.set_yticks([2 ** (k / 2) for k in range(lo, hi + 1, step)])
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}x"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("batch size", fontsize=7)
            ax.set_ylabel("speedup vs torch.nn", fontsize=7)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------------------
# Progress on stderr: a bar redrawn in place on a terminal, a line per step elsewhere (logs stay readable)
# ---------------------------------------------------------------------------------------------------------
class Progress:
    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()

    def step(self, label: str) -> None:
        if not self.enabled:
            return
        self.done += 1
        elapsed = time.monotonic() - self.start
        frac = min(self.done / self.total, 1.0)
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        text = f"[{bar}] {self.done}/{self.total} {elapsed:5.0f}s {label}"
        if self.tty:
            cols = 120
            self.stream.write("\r" + text[:cols].ljust(cols))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
