"""`python -m fusedrnn.bench` / `fusedrnn-bench`: fusedrnn backends against torch.nn (cuDNN on a GPU).

    python -m fusedrnn.bench                          # default preset on the current device
    python -m fusedrnn.bench --preset deepbench --mode fwd --dtype float16
    python -m fusedrnn.bench --cell gru --shape 100,32,512,512 --shape 100,64,512,512 --backend reference
    python -m fusedrnn.bench --list                   # what would run, without running it
    python -m fusedrnn.bench --replot DIR/results.json   # table and plot again from saved results

Exit status: 0 when every provider was correct and ran, 3 when one was WRONG or failed (ERROR),
2 for bad arguments.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from typing import Optional

import torch

import fusedrnn

from . import isa, tune
from . import presets as P
from . import report, runner, timing
from .providers import (auto_backends, backend_problem, extra_providers, fusedrnn_provider, torch_provider,
                        tune_backends)

DEFAULT_SEQ_LEN, DEFAULT_BATCH, DEFAULT_HIDDEN = 25, 16, 256


def _csv_list(values: Optional[list[str]]) -> list[str]:
    """--opt a,b --opt c -> [a, b, c]"""
    out = []
    for v in values or []:
        out += [s.strip() for s in v.split(",") if s.strip()]
    return out


def _positive_ints(parser, flag: str, values) -> list[int]:
    out = []
    for v in _csv_list(values):
        try:
            n = int(v)
        except ValueError:
            parser.error(f"{flag}: expected positive integers, got {v!r}")
        if n <= 0:
            parser.error(f"{flag}: expected positive integers, got {n}")
        out.append(n)
    return out


def parse_shape(text: str) -> P.Shape:
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) != 4 or any(n <= 0 for n in nums):
        raise ValueError(f"malformed --shape {text!r}: expected T,B,I,H -- four positive integers "
                         f"(sequence length, batch, input size, hidden size), e.g. 25,16,512,512")
    return P.Shape(*nums)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusedrnn-bench",
        description="Benchmark fusedrnn's backends against torch.nn (cuDNN on a GPU, oneDNN/ATen on a CPU). "
                    "Every provider is checked against torch.nn on every shape before it is timed; a wrong "
                    "one is reported WRONG and not timed.",
        epilog="Lists take commas or repeated flags (--cell lstm,gru == --cell lstm --cell gru). "
               "Presets: " + "; ".join(f"{n}: {pr.description}" for n, pr in P.PRESETS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help=f"shape set ({', '.join(P.PRESETS)}); default: quick on a CPU, "
                                    "deepbench on a GPU")
    p.add_argument("--cell", action="append", help=f"cells ({', '.join(P.CELLS)}); default: the preset's")
    p.add_argument("--dtype", action="append",
                   help=f"dtypes ({', '.join(P.DTYPES)}); default: float16 on a GPU, float32 on a CPU")
    p.add_argument("--mode", action="append", help="fwd (inference, no_grad) and/or fwdbwd (forward + "
                                                   "backward of every output); default: the preset's (both)")
    p.add_argument("--backend", action="append",
                   help="fusedrnn backends to benchmark: names, 'default' (those 'auto' may pick on the "
                        "device and that are available), 'all' (every available one), or 'none'; default: "
                        "default. torch.nn always runs: it is the baseline")
    p.add_argument("--device", help="cpu, cuda or cuda:N; default: cuda when available, else cpu")
    p.add_argument("--shape", action="append", metavar="T,B,I,H",
                   help="a shape to run instead of the preset's (repeatable)")
    p.add_argument("--seq-len", action="append", help=f"grid of shapes with --batch/--hidden instead of the "
                                                       f"preset's (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--batch", action="append", help=f"batch sizes of the grid (default {DEFAULT_BATCH})")
    p.add_argument("--hidden", action="append", help=f"hidden sizes of the grid (default {DEFAULT_HIDDEN})")
    p.add_argument("--input-size", type=int, help="input size of the grid's shapes (default: = hidden)")
    p.add_argument("--layers", action="append", help="numbers of stacked layers (default 1)")
    p.add_argument("--bidirectional", action="store_true", help="bidirectional modules")
    p.add_argument("--out", help="output folder (default ./fusedrnn-bench-<device>-<date>-<time>)")
    p.add_argument("--repeats", type=int, help="timed calls per provider and case (default: the preset's)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default: the preset's)")
    p.add_argument("--max-seconds", type=float,
                   help="stop timing a provider on a case after this many measured seconds, 3 calls at least "
                        "(default: the preset's)")
    p.add_argument("--time-limit", type=float, help="start no new case after this many seconds; the rest is "
                                                    "listed as not run (default: none)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads on a CPU (default: torch's)")
    p.add_argument("--isa", help="CPU instruction-set level(s): avx512, avx2, baseline (comma-separated) or all; "
                                 "each runs in a fresh process with fusedrnn's cpu kernels and torch (ATen, "
                                 "oneDNN, MKL) capped to that level, results in --out/<level>")
    p.add_argument("--tune", action="store_true",
                   help="measure the backends 'auto' chooses among (default preset: tune) and write the dispatch "
                        "table --out/dispatch-<device class>.json; point $FUSEDRNN_DISPATCH_TABLE at it")
    p.add_argument("--lengths", action="store_true",
                   help="variable lengths instead of the preset: one batch of mixed lengths run padded, as a "
                        "PackedSequence and with lengths=, torch.nn and fusedrnn (--cell default lstm,gru; "
                        "--seq-len default 10,100,1000; --batch default 16; --hidden default 128); "
                        "results.json in --out")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default 0)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--list", action="store_true", help="print the cases and providers, run nothing")
    p.add_argument("--replot", metavar="RESULTS",
                   help="print the table and redraw the plot of a results.json/.csv (into --out, else beside "
                        "it); runs nothing")
    return p


def _choose(parser, flag: str, given, allowed, aliases=None) -> list[str]:
    out = []
    for v in _csv_list(given):
        v = v.lower()
        v = (aliases or {}).get(v, v)
        if v not in allowed:
            parser.error(f"{flag}: unknown value {v!r}; expected one of {', '.join(allowed)}")
        if v not in out:
            out.append(v)
    return out


def resolve(args, parser) -> tuple[torch.device, P.Preset, list[P.Case], list, dict]:
    """Validates the arguments; returns (device, preset, cases, providers, run settings)."""
    device = _resolve_device(args, parser)
    return (device,) + _resolve_cases(args, parser, device)


def _resolve_device(args, parser) -> torch.device:
    dev_text = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(dev_text)
    except RuntimeError:
        parser.error(f"--device: {dev_text!r} is not a device; expected cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: {dev_text!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {dev_text}: CUDA is not available here (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {dev_text}: only {torch.cuda.device_count()} CUDA device(s)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _resolve_cases(args, parser, device: torch.device):
    preset_name = (args.preset or ("tune" if args.tune else P.default_preset(device))).lower()
    if preset_name not in P.PRESETS:
        parser.error(f"--preset: unknown preset {preset_name!r}; expected one of {', '.join(P.PRESETS)}")
    preset = P.PRESETS[preset_name]

    cells = _choose(parser, "--cell", args.cell, P.CELLS) or list(preset.cells)
    dtypes = _choose(parser, "--dtype", args.dtype, list(P.DTYPES), P.DTYPE_ALIASES) or [P.default_dtype(device)]
    modes = _choose(parser, "--mode", args.mode, P.MODES, {"fwd+bwd": "fwdbwd", "train": "fwdbwd",
                                                           "forward": "fwd", "inference": "fwd"}) \
        or list(preset.modes)
    layers = _positive_ints(parser, "--layers", args.layers) or [1]

    # shapes: explicit ones replace the preset's
    explicit = []
    for text in args.shape or []:
        try:
            explicit.append(parse_shape(text))
        except ValueError as e:
            parser.error(str(e))
    grid_t = _positive_ints(parser, "--seq-len", args.seq_len)
    grid_b = _positive_ints(parser, "--batch", args.batch)
    grid_h = _positive_ints(parser, "--hidden", args.hidden)
    if args.input_size is not None and args.input_size <= 0:
        parser.error(f"--input-size: expected a positive integer, got {args.input_size}")
    if grid_t or grid_b or grid_h or args.input_size:
        for h in grid_h or [DEFAULT_HIDDEN]:
            for b in grid_b or [DEFAULT_BATCH]:
                for t in grid_t or [DEFAULT_SEQ_LEN]:
                    explicit.append(P.Shape(t, b, args.input_size or h, h))
    explicit = list(dict.fromkeys(explicit))

    cases = []
    for cell in cells:
        shapes = explicit or preset.shapes_for(cell)
        for dtype in dtypes:
            for mode in modes:
                for L in layers:
                    for s in shapes:
                        cases.append(P.Case(cell, s, dtype, mode, L, args.bidirectional))
    if not cases:
        parser.error(f"no cases: preset {preset.name!r} has no shapes for cells {cells}; give --shape")

    # providers
    names = _csv_list(args.backend) or (tune_backends(device) if args.tune else ["default"])
    backends: list[str] = []
    for name in names:
        if name == "default":
            chosen = auto_backends(device)
        elif name == "all":
            chosen = fusedrnn.available_backends(device)
        elif name == "none":
            chosen = []
        else:
            why = backend_problem(name, device)
            if why:
                parser.error(f"--backend: {why}")
            chosen = [name]
        backends += [b for b in chosen if b not in backends]
    providers = [torch_provider(device)] + [fusedrnn_provider(b) for b in backends] + extra_providers()

    for flag, value in (("--repeats", args.repeats), ("--warmup", args.warmup)):
        if value is not None and value < (1 if flag == "--repeats" else 0):
            parser.error(f"{flag}: expected {'a positive' if flag == '--repeats' else 'a non-negative'} "
                         f"integer, got {value}")
    if args.threads is not None and args.threads <= 0:
        parser.error(f"--threads: expected a positive integer, got {args.threads}")
    settings = dict(warmup=preset.warmup if args.warmup is None else args.warmup,
                    repeats=preset.repeats if args.repeats is None else args.repeats,
                    max_seconds=preset.max_seconds if args.max_seconds is None else args.max_seconds,
                    time_limit=math.inf if args.time_limit is None else args.time_limit)
    return preset, cases, providers, settings


def explicit_shapes(args) -> bool:
    return bool(args.shape or args.seq_len or args.batch or args.hidden or args.input_size)


def _replot(args) -> int:
    meta, rows = report.read_rows(args.replot)
    out = args.out or os.path.dirname(os.path.abspath(args.replot))
    os.makedirs(out, exist_ok=True)
    print(report.format_table(rows))
    if not args.no_plot:
        png = os.path.join(out, "speedup.png")
        why = report.plot_speedup(png, rows, _title(meta or (rows[0] if rows else {})))
        print(f"plot: {why}" if why else f"plot: {png}")
    return 0


def _title(meta: dict) -> str:
    if not meta:
        return ""
    commit = str(meta.get("commit", "unknown"))[:10]
    return (f"{meta.get('device_name', '?')} | torch {meta.get('torch_version', '?')} | CUDA "
            f"{meta.get('cuda_version', '?')} | fusedrnn {meta.get('fusedrnn_version', '?')} @ {commit}")


def _run_levels(args, argv: list[str], parser) -> int:
    """--isa: this command again at each level, in a fresh process each (the caps apply at library load)."""
    try:
        levels = isa.requested_levels(args.isa)
    except ValueError as e:
        parser.error(str(e))
    rest, skip = [], False
    for a in argv:  # drop --isa and --out; each level gets its own --out
        if skip:
            skip = False
        elif a in ("--isa", "--out"):
            skip = True
        elif not a.startswith(("--isa=", "--out=")):
            rest.append(a)
    base = args.out or f"fusedrnn-bench-cpu-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    status = 0
    for level in levels:
        status = max(status, isa.run_at_level(level, ["-m", "fusedrnn.bench", *rest, "--out",
                                                      os.path.join(base, level)]))
    return status


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.isa and not isa.in_level_child():
        return _run_levels(args, sys.argv[1:] if argv is None else list(argv), parser)
    if args.replot:
        if not os.path.exists(args.replot):
            parser.error(f"--replot: no such file {args.replot!r}")
        return _replot(args)
    if args.lengths:
        return _run_lengths(args, parser)
    device, preset, cases, providers, settings = resolve(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # CUDA events and memory stats follow the current device

    source = "shapes from the command line" if explicit_shapes(args) else f"preset {preset.name}"
    header = (f"fusedrnn-bench: {source}, {len(cases)} cases x {len(providers)} providers "
              f"({', '.join(p.name for p in providers)}) on {device}; warmup {settings['warmup']}, up to "
              f"{settings['repeats']} timed calls or {settings['max_seconds']:g} s each")
    if args.list:
        print(header)
        for c in cases:
            print(f"  {c.id}  {P.case_flops(c) / 1e9:.3g} GFLOP")
        return 0

    env = report.environment(device)
    env["mem_method"] = timing.memory_method(device)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or f"fusedrnn-bench-{device.type}-{stamp}"
    os.makedirs(out, exist_ok=True)
    json_path, csv_path, png_path = (os.path.join(out, n) for n in ("results.json", "results.csv", "speedup.png"))
    run_meta = {**env, "preset": preset.name, "shapes": "command line" if explicit_shapes(args) else "preset",
                "argv": sys.argv[1:] if argv is None else list(argv),
                "providers": [p.name for p in providers], "n_cases": len(cases), **{
                    k: (None if v == math.inf else v) for k, v in settings.items()},
                "tolerance_rule": "max error vs float64 torch.nn <= 2 x torch.nn's own error + a few ulp",
                "flop_count": "matrix products only, 2 per multiply-add; fwdbwd = 3 x fwd (fusedrnn/bench/"
                              "presets.py)"}
    print(header, file=sys.stderr)
    print(f"device: {env['device_name']} | torch {env['torch_version']} | CUDA {env['cuda_version']} | "
          f"commit {env['commit'][:12]} | threads {env['threads']} | load {env['load_avg']} | "
          + (f"ISA {env['cpu_isa']} | " if "cpu_isa" in env else "") +
          f"memory: {env['mem_method']}",
          file=sys.stderr)

    if device.type == "cpu" and env["load_avg"] != "n/a":
        load, cores = float(env["load_avg"].split()[0]), os.cpu_count() or 1
        if load > cores:
            warning = (f"load average {load:.1f} exceeds the {cores} cores: other processes share this CPU and "
                       f"multi-threaded timings swing wildly under contention; --threads 1 measures more stably")
            run_meta["warning"] = warning
            print(f"warning: {warning}", file=sys.stderr)

    progress = report.Progress(len(cases) * len(providers), enabled=not args.no_progress)

    def save(rows):
        report.write_json(json_path, run_meta, rows)
        report.write_csv(csv_path, rows)

    config = runner.Config(device, cases, providers, settings["warmup"], settings["repeats"],
                           settings["max_seconds"], settings["time_limit"], args.seed, env)
    try:
        rows, stopped = runner.run(config, on_unit=progress.step, on_case=save)
    finally:
        progress.close()
    if stopped:
        run_meta["stopped_early"] = stopped
    run_meta["load_avg_end"] = report.load_average()
    save(rows)

    print(report.format_table(rows))
    if stopped:
        print(f"\nStopped early: {stopped}")
    print(f"\nresults: {json_path}\n         {csv_path}")
    if args.tune:
        table = tune.build_table(rows, device, env)
        if table is None:
            print("dispatch table: nothing to write (no fusedrnn backend was timed)")
        else:
            path = tune.write_table(out, table)
            print(f"dispatch table: {path} ({len(table.entries)} entries, {table.device_class}); use it with "
                  f"FUSEDRNN_DISPATCH_TABLE={path}")
    if not args.no_plot:
        why = report.plot_speedup(png_path, rows, _title(env))
        print(f"plot: {why}" if why else f"plot:    {png_path}")
    bad = [r for r in rows if r["status"] in (runner.WRONG, runner.ERROR)]
    return 3 if bad else 0


if __name__ == "__main__":
    sys.exit(main())


def _run_lengths(args, parser) -> int:
    """--lengths: fusedrnn/bench/lengths.py's comparison on this command's device, cells and sizes."""
    from . import lengths
    device = _resolve_device(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    cells = _choose(parser, "--cell", args.cell, list(lengths.CELLS)) or ["lstm", "gru"]
    modes = _choose(parser, "--mode", args.mode, P.MODES, {"fwd+bwd": "fwdbwd", "train": "fwdbwd",
                                                           "forward": "fwd", "inference": "fwd"}) or list(P.MODES)
    seq_lens = _positive_ints(parser, "--seq-len", args.seq_len) or [10, 100, 1000]
    batch = (_positive_ints(parser, "--batch", args.batch) or [16])[0]
    hidden = (_positive_ints(parser, "--hidden", args.hidden) or [128])[0]
    out = args.out or f"fusedrnn-bench-lengths-{device.type}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(out, exist_ok=True)
    lengths.run(cells, modes, seq_lens, batch, hidden, args.repeats or 10, args.max_seconds or 5.0, device,
                torch.float16 if device.type == "cuda" else torch.float32, os.path.join(out, "results.json"))
    print(f"results: {os.path.join(out, 'results.json')}")
    return 0
