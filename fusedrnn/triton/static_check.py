"""Ahead-of-time compile of the Triton kernel configurations the dispatcher can pick on a GPU target, with
their resource usage read from the cubin: the closest a machine without a GPU gets to running them.

    python -m fusedrnn.triton.static_check [--arch 90] [--jobs 2] [--all] [--json out.json]

Needs TRITON_INTERPRET unset (interpreter functions cannot be compiled). For each configuration: registers,
stack / local memory and spill instructions (STL/LDL in SASS), static + dynamic shared memory, tensor-core
instructions (HMMA = mma.sync, HGMMA = wgmma). Results are cached on disk per kernel source, constexprs,
options, target and Triton version, so only changed kernels recompile.

Which configurations: every autotune config x dtype x kernel (persistent with and without barrier,
pointwise), at the largest size each dispatch rule admits (the most weights, registers and shared memory)
with every optional input on (bias, lengths, workspace, reverse) and an odd hidden size (masks, no
vectorisation: the most registers). --all adds every smaller block size and the aligned sizes.
The row kernels of rnn_layer_ext (rnn_ext.py, fp64 too): each cell x dtype with every flag on (norms, bias,
zoneout, valid) at the widest one-warp block and at the widest block unsupported_reason accepts (the most
lanes per thread at one warp and at the most warps); --all adds every block in between.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Optional

DTYPES = {"fp32": 4, "fp16": 2, "bf16": 2}
EXT_DTYPES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}  # the row kernels of rnn_layer_ext take fp64 too
# Pointer arguments whose dtype is not the storage dtype.
_POINTER_DTYPES = {"b_ih_ptr": "fp32", "b_hh_ptr": "fp32", "len_ptr": "i64", "sync_ptr": "i32",
                   "gh0_ptr": "fp32", "gc0_ptr": "fp32", "c_prev_ptr": "fp32", "c_next_ptr": "fp32",
                   "gh_in_ptr": "fp32", "gh_out_ptr": "fp32", "gc_in_ptr": "fp32", "gc_out_ptr": "fp32"}
REGISTER_FILE = 65536  # 32-bit registers per SM (sm_70 .. sm_90)
MAX_REGS_PER_THREAD = 255
SMEM_LIMIT = 227 * 1024  # per block on sm_90
RESULT_VERSION = 2  # bump when compile_variant records something new (invalidates the cache)


@dataclass
class Variant:
    module: str  # "rnn_persistent" | "rnn_pointwise"
    kernel: str
    dtype: str
    constexprs: dict
    num_warps: int
    num_stages: int
    uses_dot: bool
    label: str = ""
    result: dict = field(default_factory=dict)
    pointer_dtypes: dict = field(default_factory=dict)  # per-kernel overrides of _POINTER_DTYPES
    maxnreg: Optional[int] = None  # the launch's maxnreg (ptxas .maxnreg), when it sets one

    @property
    def name(self) -> str:
        return f"{self.kernel}[{self.label}-{self.dtype}-w{self.num_warps}]"


def _kernel(v: Variant):
    import importlib
    return getattr(importlib.import_module(f"fusedrnn.triton.{v.module}"), v.kernel)


def _cfgs(module):
    return [(c.kwargs, c.num_warps, c.num_stages) for c in module._CONFIGS]


def persistent_sizes(cell: str, proj: bool, elem: int, all_sizes: bool) -> list:
    """(label, H, HO, BLOCK_H, BLOCK_HO, barrier, weight bytes) the dispatch rules of rnn_persistent admit:
    no barrier, every block that fits; barrier, every (slice, block) barrier_slice picks beyond that.
    Hidden sizes one below the block (odd: masked, unvectorised), and the block itself with all_sizes."""
    from . import rnn_persistent as P
    out = []
    blocks = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    for b in blocks:
        for H in [b - 1] + ([b] if all_sizes else []):
            if H < 1 or P.block(H) != b:
                continue
            # the projection is narrower than H: every narrower block, its widest odd size
            for HO in [min(bo - 1, H - 1) for bo in blocks if bo <= b] if proj else [H]:
                if HO < 1 or HO > H:
                    continue
                if P.no_barrier_fits(cell, H, HO, elem, proj):
                    out.append((f"H{H}" + (f"-P{HO}" if proj else ""), H, HO, b, P.block(HO), False,
                                P.weight_bytes(cell, b, P.block(HO), elem, proj)))
                elif not proj:
                    sl = P.barrier_slice(cell, H, elem)
                    if sl is not None:
                        out.append((f"H{H}-barrier{sl}", H, H, sl, b, True, P.weight_bytes(cell, sl, b, elem)))
    return out


def variants(all_sizes: bool = False) -> list:
    """The configurations to compile (see the module doc)."""
    from . import rnn_persistent as P
    from . import rnn_pointwise as PW
    out = []
    cells = [("lstm", False), ("lstm", True), ("gru", False), ("rnn_tanh", False), ("rnn_relu", False)]
    for dtype, elem in DTYPES.items():
        for cell, proj in cells:
            stem = "rnn" if cell.startswith("rnn") else cell
            sizes = persistent_sizes(cell, proj, elem, all_sizes)
            for direction in ("fwd", "bwd"):
                name = f"{stem}_persistent_{direction}_kernel"
                for kw, nw, ns in _cfgs(P):
                    # the autotuner's pruning: this config only where config_allowed
                    ok = [sz for sz in sizes if P.config_allowed(nw, sz[6])]
                    if not all_sizes:  # the largest of each kind (no barrier; each barrier slice)
                        largest = {}
                        for sz in ok:
                            kind = (sz[5], sz[3] if sz[5] else None)
                            if kind not in largest or sz[6] >= largest[kind][6]:
                                largest[kind] = sz
                        ok = list(largest.values())
                    for label, H, HO, bh, bho, barrier, _ in ok:
                        cx = dict(HAS_LENGTHS=True, REVERSE=True, BARRIER=barrier, DOT_FP32=False,
                                  BLOCK_H=bh, BLOCK_HO=bho, H=H, **kw)
                        if stem == "lstm":
                            cx.update(HO=HO, HAS_PROJ=proj)
                        if stem == "rnn":
                            cx["RELU"] = cell == "rnn_relu"
                        if direction == "fwd":
                            cx["HAS_BIAS"] = True
                            if stem != "rnn":
                                cx["WRITE_WS"] = True
                        out.append(Variant("rnn_persistent", name, dtype, cx, nw, ns, True, label))
            if proj:
                continue
            for direction in ("fwd", "bwd"):
                name = f"{stem}_pointwise_{direction}_kernel"
                for kw, nw, ns in _cfgs(PW):
                    cx = dict(HAS_LENGTHS=True, **kw)
                    if stem == "rnn":
                        cx["RELU"] = cell == "rnn_relu"
                    if direction == "fwd":
                        cx["HAS_BIAS"] = True
                        if stem != "rnn":
                            cx["WRITE_WS"] = True
                    elif stem != "rnn":
                        cx["REVERSE"] = True
                    if stem == "lstm":
                        cx["HAS_PROJ"] = False
                    out.append(Variant("rnn_pointwise", name, dtype, cx, nw, ns, False, f"BLOCK{kw['BLOCK']}"))
                    if stem == "lstm":  # the projection changes which buffers the kernel touches
                        out.append(Variant("rnn_pointwise", name, dtype, dict(cx, HAS_PROJ=True), nw, ns, False,
                                           f"BLOCK{kw['BLOCK']}-proj"))
    # relu differs from tanh by one instruction; keep both only when asked for everything
    if not all_sizes:
        out = [v for v in out if not v.constexprs.get("RELU", False)]
    return _dedup(out + ext_variants(all_sizes))


def ext_blocks(elem: int, all_sizes: bool) -> list:
    """Blocks of the rnn_layer_ext row kernels to check at an element size: the widest at one warp and the
    widest rnn_ext accepts (every power of two up to it with all_sizes)."""
    from . import rnn_ext as E
    top = E.block(E.MAX_HIDDEN[elem])
    if all_sizes:
        return [1 << k for k in range(top.bit_length())]
    return sorted({min(top, 32 * E.LANES_PER_THREAD[elem]), top})


def ext_variants(all_sizes: bool = False) -> list:
    """The row kernels of rnn_layer_ext: cell x dtype x block, every flag on, H = BLOCK - 1 (masked lanes; the
    blocks 1 and 2 hold only H = 1 and 2)."""
    from . import rnn_ext as E
    out = []
    for dtype, elem in EXT_DTYPES.items():
        acc = "fp64" if dtype == "fp64" else "fp32"
        ptrs = {"valid_ptr": "u8", "b_ih_ptr": dtype, "b_hh_ptr": dtype, "c_prev_ptr": dtype, "grad_h_ptr": acc,
                "grad_c_ptr": acc, "acc_ptr": acc, "gh_prev_ptr": acc, "gc_prev_ptr": acc}
        for cell, G in (("lstm", 4), ("gru", 3)):
            for bl in ext_blocks(elem, all_sizes):
                cx = dict(G=G, HAS_LN=True, HAS_LN_C=G == 4, HAS_BIAS=True, HAS_ZONEOUT_H=True,
                          HAS_ZONEOUT_C=G == 4, HAS_VALID=True, FP64=dtype == "fp64", BLOCK=bl)
                for kernel in ("ext_forward_rows_kernel", "ext_backward_rows_kernel"):
                    out.append(Variant("rnn_ext", kernel, dtype, cx, E.num_warps(bl, elem), 1, False,
                                       f"{cell}-H{bl - 1 if bl > 2 else bl}", pointer_dtypes=ptrs,
                                       maxnreg=E.MAX_REGISTERS))
    return out


def _dedup(vs):
    seen, out = set(), []
    for v in vs:
        key = (v.kernel, v.dtype, json.dumps(v.constexprs, sort_keys=True), v.num_warps, v.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def _signature(fn, dtype, constexprs, pointer_dtypes=None):
    sig = {}
    pointers = dict(_POINTER_DTYPES, **(pointer_dtypes or {}))
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, dtype)
        else:
            sig[name] = "i32"  # no divisibility hint: the worst case the runtime can specialise
    return sig


def _bin(tool):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _cache_key(v: Variant, arch: int) -> str:
    import triton
    fn = _kernel(v)
    key = [RESULT_VERSION, fn.cache_key, v.dtype, v.constexprs, v.num_warps, v.num_stages, arch, triton.__version__]
    if v.pointer_dtypes or v.maxnreg:  # (only then: the other kernels keep their cached results)
        key += [v.pointer_dtypes, v.maxnreg]
    raw = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _cache_dir() -> str:
    d = os.environ.get("FUSEDRNN_STATIC_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fusedrnn", "triton_static")
    os.makedirs(d, exist_ok=True)
    return d


def compile_variant(v: Variant, arch: int = 90) -> dict:
    path = os.path.join(_cache_dir(), _cache_key(v, arch) + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(v)
    t0 = time.time()
    src = ASTSource(fn=fn, signature=_signature(fn, v.dtype, v.constexprs, v.pointer_dtypes), constexprs=v.constexprs)
    try:
        options = dict(num_warps=v.num_warps, num_stages=v.num_stages)
        if v.maxnreg:
            options["maxnreg"] = v.maxnreg
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # noqa: BLE001  (reported per configuration; the test fails on it)
        res = {"compiled": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    else:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                                   check=True).stdout
            sass = subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout
        fields = {}
        for line in usage.splitlines():
            if "REG:" in line:
                for tok in line.split():
                    if ":" in tok:
                        key, _, val = tok.partition(":")
                        if val.isdigit():
                            fields[key] = int(val)
        ops = [ln.split(";")[0] for ln in sass.splitlines() if "/*" in ln]
        res = {"compiled": True, "regs": fields.get("REG"), "stack": fields.get("STACK"),
               "local": fields.get("LOCAL"), "shared_static": fields.get("SHARED"),
               "shared_dynamic": k.metadata.shared,
               "spill_stores": sum(" STL" in o for o in ops), "spill_loads": sum(" LDL" in o for o in ops),
               "hmma": sum("HMMA" in o for o in ops), "hgmma": sum("HGMMA" in o for o in ops),
               "threads": 32 * v.num_warps, "seconds": round(time.time() - t0, 2)}
        # the grid barrier's memory ordering, as emitted: a release add, acquire polls, L2-only state loads
        ptx = k.asm["ptx"]
        res.update(ptx_release_add=ptx.count("atom.global.gpu.release.add"),
                   ptx_acquire=ptx.count("ld.global.gpu.acquire") + ptx.count("atom.global.gpu.acquire"),
                   ptx_cg_loads=ptx.count("ld.global.cg"), ptx_bar_sync=ptx.count("bar.sync"))
    with open(path + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(path + ".tmp", path)
    return res


def _worker(args):
    v, arch = args
    return compile_variant(v, arch)


def problems(v: Variant) -> list:
    """What is wrong with a compiled configuration (empty when it passes)."""
    r = v.result
    if not r.get("compiled"):
        return [f"does not compile: {r.get('error')}"]
    out = []
    if r["stack"] or r["local"] or r["spill_stores"] or r["spill_loads"]:
        out.append(f"spills: stack {r['stack']} B, local {r['local']} B, "
                   f"{r['spill_stores']} STL / {r['spill_loads']} LDL")
    smem = r["shared_static"] + r["shared_dynamic"]
    if smem > SMEM_LIMIT:
        out.append(f"shared memory {smem} B > {SMEM_LIMIT} B")
    if r["regs"] > MAX_REGS_PER_THREAD or r["regs"] * r["threads"] > REGISTER_FILE:
        out.append(f"{r['regs']} registers x {r['threads']} threads exceed the register file")
    # tensor cores wherever tl.dot runs (fp16/bf16 directly, fp32 as tf32x3)
    if v.uses_dot and r["hmma"] + r["hgmma"] == 0:
        out.append("tl.dot without HMMA/HGMMA instructions")
    return out


def run(arch: int = 90, jobs: int = 1, all_sizes: bool = False) -> list:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreter functions cannot be compiled")
    vs = variants(all_sizes)
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as ex:
            results = list(ex.map(_worker, [(v, arch) for v in vs]))
    else:
        results = [compile_variant(v, arch) for v in vs]
    for v, r in zip(vs, results):
        v.result = r
    return vs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--all", action="store_true", help="every block size, aligned and odd hidden sizes")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    vs = run(args.arch, args.jobs, args.all)
    bad = 0
    for v in vs:
        r, p = v.result, problems(v)
        bad += bool(p)
        if r.get("compiled"):
            smem = r["shared_static"] + r["shared_dynamic"]
            print(f"{v.name:70s} regs {r['regs']:3d} stack {r['stack']} smem {smem:6d} "
                  f"HMMA {r['hmma']:3d} HGMMA {r['hgmma']:3d} {'; '.join(p) or 'ok'}")
        else:
            print(f"{v.name:70s} {'; '.join(p)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(asdict(v), name=v.name, problems=problems(v)) for v in vs], f, indent=1)
    print(f"{len(vs)} configurations, {bad} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
