"""Variable lengths at padded speed? One batch of mixed lengths, run padded, packed and with `lengths=`.

pytorch #149194: torch.nn's PackedSequence path is 5x (T=10) to 114x (T=4000) slower than the same batch
padded. For each (cell, T) this times, with the same weights and the same batch (lengths drawn uniformly in
[T/4, T], the longest = T), interleaved call by call:
    torch padded            the whole padded batch (wrong past each end, the baseline of speed)
    torch packed            pack_padded_sequence(enforce_sorted=False) -> module -> pad_packed_sequence
    fusedrnn padded         the whole padded batch (auto)
    fusedrnn lengths=       module(padded, lengths=lengths)      (auto: a fused backend, see README)
    fusedrnn packed         module(PackedSequence)               (auto), with the caller's pack / pad
    fusedrnn packed module  the module call alone on a PackedSequence built once (as a data loader hands it):
                            on the CPU the layers run on the packed rows in place
    fusedrnn packed (fusedrnn pack/pad)  as "fusedrnn packed", with fusedrnn.pack_padded_sequence and
                            fusedrnn.pad_packed_sequence (C++ on the CPU) in the caller's code
fwd (no_grad) and fwd+bwd. Entry points: `python -m fusedrnn.bench --lengths` and bench/bench_lengths.py.
"""
from __future__ import annotations

import json
from typing import Optional

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedrnn

from .timing import median_ms

CELLS = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN"}


def run_case(cell: str, T: int, B: int, H: int, mode: str, repeats: int, max_seconds: float,
             device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> dict:
    torch.manual_seed(0)
    ref = getattr(torch.nn, CELLS[cell])(H, H).to(device, dtype)
    ours = getattr(fusedrnn, CELLS[cell])(H, H).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, H, device=device, dtype=dtype)
    lengths = torch.randint(max(1, T // 4), T + 1, (B,))  # on the CPU, as pack_padded_sequence wants them
    lengths[0] = T
    packed = lambda: pack_padded_sequence(x, lengths, enforce_sorted=False)  # noqa: E731
    fns = {
        "torch padded": lambda: ref(x)[0],
        "torch packed": lambda: pad_packed_sequence(ref(packed())[0], total_length=T)[0],
        "fusedrnn padded": lambda: ours(x)[0],
        "fusedrnn lengths=": lambda: ours(x, lengths=lengths)[0],
        "fusedrnn packed": lambda: pad_packed_sequence(ours(packed())[0], total_length=T)[0],
        "fusedrnn packed module": lambda: ours(prebuilt)[0].data,
        # the same with fusedrnn's drop-ins for torch's pack / pad functions
        "fusedrnn packed (fusedrnn pack/pad)": lambda: fusedrnn.pad_packed_sequence(
            ours(fusedrnn.pack_padded_sequence(x, lengths, enforce_sorted=False))[0], total_length=T)[0],
    }
    prebuilt = packed()
    # same answers where defined: packed torch == fusedrnn lengths= == fusedrnn packed
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    with torch.no_grad():
        want = fns["torch packed"]().float()
        for name in ("fusedrnn lengths=", "fusedrnn packed", "fusedrnn packed (fusedrnn pack/pad)"):
            err = (fns[name]().float() - want).abs().max().item()
            if not err <= tolerance:
                raise RuntimeError(f"{name} disagrees with torch.nn packed at {cell} T={T}: max error {err}")
    ms = median_ms(fns, mode, repeats, max_seconds, device)
    return {"cell": cell, "T": T, "B": B, "H": H, "mode": mode, "device": str(device), "dtype": str(dtype),
            "ms": {k: round(v, 4) for k, v in ms.items()},
            "backend_lengths": fusedrnn.explain(ours, x, lengths=lengths).backends[0],
            "backend_padded": fusedrnn.explain(ours, x).backends[0]}


HEADER = (f"{'case':26s} {'torch pad':>9s} {'torch pack':>10s} {'pack/pad':>8s} | {'fused pad':>9s} "
          f"{'lengths=':>9s} {'len/pad':>7s} {'packed':>9s} {'pack/pad':>8s} {'module':>8s} {'mod/pad':>7s}"
          f" {'f.pack':>8s} {'f/pad':>6s}  (ms; backend lengths/padded)")


def format_row(r: dict) -> str:
    m = r["ms"]
    pad = m["fusedrnn padded"]
    return (f"{r['cell']}-{r['mode']}-T{r['T']}-B{r['B']}-H{r['H']}".ljust(26) +
            f" {m['torch padded']:9.2f} {m['torch packed']:10.2f} {m['torch packed'] / m['torch padded']:8.2f}"
            f" | {pad:9.2f} {m['fusedrnn lengths=']:9.2f} {m['fusedrnn lengths='] / pad:7.2f} "
            f"{m['fusedrnn packed']:9.2f} {m['fusedrnn packed'] / pad:8.2f} {m['fusedrnn packed module']:8.2f} "
            f"{m['fusedrnn packed module'] / pad:7.2f} {m['fusedrnn packed (fusedrnn pack/pad)']:8.2f} "
            f"{m['fusedrnn packed (fusedrnn pack/pad)'] / pad:6.2f}  ({r['backend_lengths']}/{r['backend_padded']})")


def run(cells, modes, seq_lens, B: int, H: int, repeats: int, max_seconds: float,
        device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
        json_path: Optional[str] = None) -> list[dict]:
    """Every (cell, mode, T): prints the table as it goes; writes the rows to json_path when given."""
    print(HEADER, flush=True)
    rows = []
    for cell in cells:
        for mode in modes:
            for T in seq_lens:
                r = run_case(cell, T, B, H, mode, repeats, max_seconds, device, dtype)
                rows.append(r)
                print(format_row(r), flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows
