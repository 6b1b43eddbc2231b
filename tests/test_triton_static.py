"""Static checks of the Triton kernels for sm_90, on a machine without a GPU.

Every kernel configuration the dispatcher can pick on sm_90 -- each autotune config that survives the
autotuner's pruning, each dtype, the persistent kernels with and without grid barrier at the largest size
their dispatch rule admits, the fused gate kernels -- is compiled ahead of time with
triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) (fusedrnn/triton/static_check.py), and
its cubin must show: no spills (no stack, no local memory, no STL/LDL in SASS), shared memory within
227 KB, registers within the register file for the launch, and tensor-core instructions (HMMA / HGMMA)
wherever tl.dot runs.

The compiles run in a subprocess without TRITON_INTERPRET (conftest sets it for this process; interpreter
functions cannot be compiled) and are cached per kernel source (~/.cache/fusedrnn/triton_static, or
$FUSEDRNN_STATIC_CACHE): a cold run compiles 108 configurations (~510 CPU-seconds, 4-5 minutes on 2 busy
cores) plus 32 of the rnn_layer_ext row kernels (~420 CPU-seconds), a warm one only what changed.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from fusedrnn.triton import rnn_ext, rnn_persistent, rnn_pointwise, static_check  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = static_check.variants()
NAMES = [v.name for v in VARIANTS]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "fusedrnn.triton.static_check", "--arch", "90",
                           "--jobs", str(min(2, os.cpu_count() or 1)), "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert out.exists(), f"static_check did not run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(out) as f:
        rows = json.load(f)
    return {r["name"]: r for r in rows}


def test_every_kernel_is_covered():
    """A kernel added to the Triton modules without a configuration here would escape the checks."""
    kernels = {name for mod in (rnn_persistent, rnn_pointwise, rnn_ext) for name, _ in inspect.getmembers(mod)
               if name.endswith("_kernel")}
    assert kernels == {v.kernel for v in VARIANTS}
    dtypes = {v.dtype for v in VARIANTS if v.module != "rnn_ext"}
    assert dtypes == {"fp32", "fp16", "bf16"}
    assert {v.dtype for v in VARIANTS if v.module == "rnn_ext"} == {"fp32", "fp16", "bf16", "fp64"}
    for kernel in kernels - {v.kernel for v in VARIANTS if v.module == "rnn_ext"}:
        warps = {v.num_warps for v in VARIANTS if v.kernel == kernel}
        assert warps == {c.num_warps for c in (rnn_persistent if "persistent" in kernel else rnn_pointwise)._CONFIGS}
    persistent = [v for v in VARIANTS if v.module == "rnn_persistent"]
    assert {v.constexprs["BARRIER"] for v in persistent} == {False, True}


def test_largest_sizes_are_the_rule_limits():
    """The checked sizes are where the dispatch rules stop: one block more would be refused."""
    P = rnn_persistent
    for v in VARIANTS:
        if v.module != "rnn_persistent" or v.constexprs["BARRIER"] or v.constexprs.get("HAS_PROJ"):
            continue
        cell = {"lstm": "lstm", "gru": "gru", "rnn": "rnn_tanh"}[v.kernel.split("_")[0]]
        elem = static_check.DTYPES[v.dtype]
        H = v.constexprs["H"]
        assert P.no_barrier_fits(cell, H, H, elem, False)
        nxt = 2 * P.block(H)
        if P.no_barrier_fits(cell, nxt, nxt, elem, False):  # then this config is pruned there
            assert not P.config_allowed(v.num_warps, P.weight_bytes(cell, nxt, nxt, elem)), v.name


_EXT_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def test_ext_rows_checked_up_to_the_accepted_limit():
    """The rnn_layer_ext row kernels are checked, every flag on, at the widest block TritonRows accepts (one
    hidden unit more is refused) and at the widest one-warp block. Every accepted block from that one up has
    the same lanes per thread (rnn_ext.LANES_PER_THREAD), narrower ones fewer: the two bound the rest."""
    E = rnn_ext
    ext = [v for v in VARIANTS if v.module == "rnn_ext"]
    for dtype, elem in static_check.EXT_DTYPES.items():
        for cell, G in (("lstm", 4), ("gru", 3)):
            mine = [v for v in ext if v.dtype == dtype and v.constexprs["G"] == G]
            assert {v.kernel for v in mine} == {"ext_forward_rows_kernel", "ext_backward_rows_kernel"}
            assert all(all(v.constexprs[f] for f in ("HAS_LN", "HAS_BIAS", "HAS_ZONEOUT_H", "HAS_VALID"))
                       for v in mine)
            blocks = {v.constexprs["BLOCK"] for v in mine}
            limit = E.MAX_HIDDEN[elem]
            assert E.TritonRows.unsupported_reason(cell, _EXT_TORCH_DTYPES[dtype], limit) is None
            assert E.TritonRows.unsupported_reason(cell, _EXT_TORCH_DTYPES[dtype], limit + 1) is not None
            assert E.block(limit) == max(blocks)
            one_warp = 32 * E.LANES_PER_THREAD[elem]
            assert min(one_warp, E.block(limit)) in blocks and E.num_warps(one_warp, elem) == 1
            for v in mine:  # launched as TritonRows launches them
                assert v.num_warps == E.num_warps(v.constexprs["BLOCK"], elem) and v.maxnreg == E.MAX_REGISTERS


def test_ext_rows_register_report(compiled):
    """Registers of the rnn_layer_ext row kernels per configuration (printed: pytest -s / -rA shows them)."""
    lines = []
    for v in VARIANTS:
        if v.module != "rnn_ext":
            continue
        r = compiled[v.name]["result"]
        assert r.get("compiled"), f"{v.name}: {r}"
        lines.append(f"{v.name:55s} regs {r['regs']:3d} x {r['threads']:4d} threads, stack {r['stack']}, "
                     f"STL {r['spill_stores']}, smem {r['shared_static'] + r['shared_dynamic']} B")
    print("\n" + "\n".join(lines))


@pytest.mark.parametrize("name", NAMES)
def test_compiles_without_spills_within_limits(compiled, name):
    v = next(v for v in VARIANTS if v.name == name)
    r = compiled[name]
    v.result = r["result"]
    assert static_check.problems(v) == [], f"{name}: {r['result']}"
    res = r["result"]
    assert res["regs"] >= 1 and res["threads"] == 32 * v.num_warps
    if v.uses_dot:  # every persistent kernel's recurrent matmul runs on tensor cores (fp32 as tf32x3)
        assert res["hmma"] + res["hgmma"] > 0


@pytest.mark.parametrize("name", [v.name for v in VARIANTS if v.module == "rnn_persistent"])
def test_grid_barrier_memory_ordering(compiled, name):
    """The barrier variant publishes with a release add and polls with acquire loads at GPU scope, and reads
    the exchanged state with L2-only (.cg) loads; the no-barrier variant has no atomics at all."""
    v = next(v for v in VARIANTS if v.name == name)
    r = compiled[name]["result"]
    if v.constexprs["BARRIER"]:
        assert r["ptx_release_add"] >= 1 and r["ptx_acquire"] >= 1 and r["ptx_cg_loads"] >= 1, r
    else:
        assert r["ptx_release_add"] == 0 and r["ptx_acquire"] == 0 and r["ptx_cg_loads"] == 0, r
