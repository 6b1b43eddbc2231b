"""The benchmark loop: for each case, check every provider against torch.nn, then time the correct ones.

Per case: build the torch.nn module (fixed seed) and the inputs; run torch.nn once in float64 on the same
(upcast) weights and inputs as the reference; run each provider once and judge it (check.py) -- a WRONG,
UNSUPPORTED or failing provider is never timed; time the others, taking turns call by call (timing.py),
measure one call's peak memory each, and derive per-step latency, throughput and the speedup over torch.nn.
"""
from __future__ import annotations

import gc
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fusedrnn import BackendUnsupportedError

from . import check, timing
from .presets import Case, case_flops
from .providers import Provider, make_torch_module

# Row status values
OK, WRONG, UNSUPPORTED, ERROR = "OK", "WRONG", "UNSUPPORTED", "ERROR"


@dataclass
class Config:
    device: torch.device
    cases: list[Case]
    providers: list[Provider]            # torch first
    warmup: int
    repeats: int
    max_seconds: float = math.inf        # per provider and case
    time_limit: float = math.inf         # for the whole run: no new case starts after this many seconds
    seed: int = 0
    meta: dict = field(default_factory=dict)


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text if len(text) < 300 else text[:297] + "..."


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _expected(ref64: dict, fn) -> dict:
    """Which named results a provider must reproduce: parameter gradients only if it has parameters."""
    if isinstance(fn, torch.nn.Module):
        return ref64
    return {k: v for k, v in ref64.items() if not k.startswith("grad_") or k in ("grad_x", "grad_h0", "grad_c0")}


def bench_case(case: Case, config: Config, on_unit: Callable[[str], None] = lambda label: None) -> list[dict]:
    device = config.device
    dtype = case.torch_dtype
    flops = case_flops(case)
    base = {**config.meta, **case.fields(), "case": case.id, "flops": flops}
    rows = []

    def row(provider: Provider, status: str, **extra) -> dict:
        r = {**base, "provider": provider.name, "provider_label": provider.label,
             "backend": provider.backend or "", "status": status}
        r.update(extra)
        rows.append(r)
        return r

    try:
        module = make_torch_module(case, device, dtype, seed=config.seed)
        inputs = check.make_inputs(case, device, seed=config.seed + 1)
        if dtype == torch.float64:
            ref_module, ref_inputs = module, inputs
        else:
            ref_module, ref_inputs = check.reference_module(module), inputs.to(torch.float64)
        ref_step = check.make_step(ref_module, ref_inputs, case.mode)
        ref64 = check.collect(ref_module, ref_inputs, ref_step(), case.mode)
        ref64 = {k: (v.detach().clone() if v is not None else None) for k, v in ref64.items()}
        del ref_step, ref_module, ref_inputs
    except Exception as e:  # the case itself cannot be set up (e.g. a dtype torch.nn lacks on this device)
        for p in config.providers:
            row(p, ERROR, detail=f"setup: {_error_text(e)}")
            on_unit(p.name)
        return rows

    # 1. build and check every provider; only the correct ones go on to be timed
    baseline: dict = {}
    timed: dict = {}      # name -> (provider, step, fn, check text, error ratio)
    for provider in config.providers:
        on_unit(f"{case.id} {provider.name}")
        is_torch = provider.name == "torch"
        try:
            with provider.context():
                fn = provider.make(case, module)
                step = check.make_step(fn, inputs, case.mode)
                results = check.collect(fn, inputs, step(), case.mode)
                timing.synchronize(device)
        except BackendUnsupportedError as e:
            row(provider, UNSUPPORTED, detail=_error_text(e))
            continue
        except Exception as e:
            row(provider, ERROR, detail=_error_text(e) + " @ " + traceback.extract_tb(e.__traceback__)[-1].name)
            continue
        verdict = check.judge(results, baseline if not is_torch else results, _expected(ref64, fn), dtype)
        if is_torch:
            baseline = results
            text = "baseline; error vs float64: " + ", ".join(f"{k} {err:.2g}" for k, (err, _) in
                                                                verdict.errors.items())
            timed[provider.name] = (provider, step, fn, text, None)
        elif not verdict.ok:
            row(provider, WRONG, detail=verdict.detail, err_ratio=verdict.worst_ratio)
        else:
            text = verdict.detail if baseline else (
                verdict.detail + " (torch.nn failed here: checked against float64 with the dtype's floor only)")
            timed[provider.name] = (provider, step, fn, text, verdict.worst_ratio)
        del results
    del baseline, ref64
    _free(device)

    # 2. time the correct ones, taking turns; then one call's peak memory each
    steps = {name: (t[1], t[0].context) for name, t in timed.items()}
    try:
        times = timing.measure(steps, device, config.warmup, config.repeats, config.max_seconds)
    except Exception:  # which one failed is unknown once they take turns: time them one by one
        times = {}
        for name, st in steps.items():
            try:
                times.update(timing.measure({name: st}, device, config.warmup, config.repeats,
                                            config.max_seconds))
            except Exception as e1:
                provider = timed[name][0]
                row(provider, ERROR, detail="while timing: " + _error_text(e1))
    for name, (provider, step, fn, text, ratio) in timed.items():
        if name not in times:
            continue
        try:
            with provider.context():
                peak = timing.peak_memory_mb(step, device)
        except Exception as e:
            row(provider, ERROR, detail="while measuring memory: " + _error_text(e))
            continue
        stats = timing.summarize(times[name])
        sec = stats["median_ms"] / 1e3
        row(provider, OK, detail=text, err_ratio=ratio, **stats,
            per_step_us=stats["median_ms"] * 1e3 / case.shape.seq_len,
            seq_per_s=case.shape.batch / sec, tflops=flops / sec / 1e12, peak_mem_mb=peak)
    del timed, steps

    order = {p.name: i for i, p in enumerate(config.providers)}
    rows.sort(key=lambda r: order[r["provider"]])
    torch_row = next((r for r in rows if r["provider"] == "torch" and r["status"] == OK), None)
    for r in rows:
        if torch_row is not None and r["status"] == OK:
            r["speedup_vs_torch"] = torch_row["median_ms"] / r["median_ms"]
    del module, inputs
    _free(device)
    return rows


def run(config: Config, on_unit: Callable[[str], None] = lambda label: None,
        on_case: Callable[[list[dict]], None] = lambda rows: None) -> tuple[list[dict], Optional[str]]:
    """Runs every case; on_case(all rows so far) after each. Returns (rows, why it stopped early or None)."""
    rows: list[dict] = []
    start = time.monotonic()
    for i, case in enumerate(config.cases):
        if time.monotonic() - start > config.time_limit:
            return rows, (f"time limit {config.time_limit:g} s reached: {i} of {len(config.cases)} cases run, "
                          f"not run: {', '.join(c.id for c in config.cases[i:])}")
        rows.extend(bench_case(case, config, on_unit))
        on_case(rows)
    return rows, None
