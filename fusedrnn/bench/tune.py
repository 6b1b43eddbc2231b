"""--tune: measure the backends "auto" chooses among and write the dispatch table (fusedrnn/backends/table.py).

    python -m fusedrnn.bench --tune --out DIR        # the "tune" preset's grid, fp32 on a CPU / fp16 on a GPU
    FUSEDRNN_DISPATCH_TABLE=DIR/dispatch-<device class>.json python your_training.py

Every backend is checked against torch.nn before it is timed (a WRONG one never enters the table). An entry
holds the median time of one module call per backend (and torch.nn's, under "torch", for the record; it is
never a candidate); fusedrnn's committed tables live in fusedrnn/dispatch_tables/<device class>.json.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Optional

import torch

from fusedrnn.backends import table as dispatch_table


def build_table(rows: list[dict], device: torch.device, meta: dict) -> Optional[dispatch_table.Table]:
    """The table of a run's rows: one entry per case (1-layer, unidirectional cases only), the OK providers'
    medians. None when no case has a timed fusedrnn backend."""
    by_case: dict = {}
    for r in rows:
        if r.get("status") != "OK" or r.get("layers", 1) != 1 or r.get("bidirectional"):
            continue
        provider = r["provider"]
        name = "torch" if provider == "torch" else provider.split(":", 1)[1] if provider.startswith("fusedrnn:") \
            else None
        if name is None or name == "auto":
            continue
        key = (r["cell"], r["dtype"], r["mode"], r["hidden"], r["batch"], r["seq_len"])
        by_case.setdefault(key, {})[name] = round(float(r["median_ms"]), 5)
    entries = [dispatch_table.Entry(c, d, m, H, B, T, ms) for (c, d, m, H, B, T), ms in by_case.items()
               if any(n != "torch" for n in ms)]
    if not entries:
        return None
    keep = ("device_name", "torch_version", "cuda_version", "commit", "git_dirty", "threads", "cpu_isa",
            "load_avg", "python")
    table_meta = {k: meta[k] for k in keep if k in meta}
    table_meta["written"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return dispatch_table.Table(dispatch_table.device_class(device), table_meta, entries, "(this run)")


def write_table(out_dir: str, table: dispatch_table.Table) -> str:
    path = os.path.join(out_dir, f"dispatch-{table.device_class}.json")
    with open(path, "w") as f:
        json.dump(table.to_json(), f, indent=1)
        f.write("\n")
    dispatch_table.parse_table(table.to_json(), path)  # what we wrote must load
    return path
