"""A first-principles latency model of the "cuda" backend's paths on Hopper (issue #17, item 4).

For each path (alternating, persistent = grid exchange, cluster) and call (cell, H, B, dtype, direction) it
estimates what one time step costs, term by term, and what a launch costs once, from the work the planner
actually lays out (csrc/cuda's plan_persistent, asked through fusedrnn::cuda_emu_rnn_persistent_plan with an
H100's limits, so no GPU is needed) and the hardware constants below. Until GPU measurements replace it, the
backend's path choice follows it (fusedrnn/backends/cuda.py: candidate_paths). NOTHING HERE IS MEASURED: every
constant names its source or says it is an assumption; bench/gpu_suite.sh's quick plan measures the per-step
latency of every path to check it.

    python -m fusedrnn.backends.cuda_latency              # the table of docs/latency_model.md
    python -m fusedrnn.backends.cuda_latency --explain lstm 768 16 float16 forward

One step, per path (the terms of `step_estimate`):
  persistent  mma       the CTA's share of W_hh (G*units rows x K) times h (K x B) on mma.sync: the larger of its
                        tensor-core throughput and its dependency chain (K / (16 * warps_k) MMAs in a row)
              reduce    split-K partial sums through shared memory (when warps_k > 1)
              pointwise the cell math of the CTA's (b, j) items
              publish   the CTA's h stores acknowledged (MEMBAR.ALL.GPU), then its step flag lands in L2
              wait      the consumers' relaxed poll returns the last flag, one acquire load, plus the skew of
                        the last of many producers
              stage     every CTA loads all of h (B x K) from L2, bounded by L2 bandwidth: after the wait (rows
                        staging), or slice by slice as each producer's flag is seen (slices staging, as built
                        where a CTA's slice is whole 16-byte pieces), which hides the read behind the spread
                        of the producers' landings and leaves the last slice's round trip
  cluster     mma, reduce, pointwise as above; publish = the slice written into every CTA of the cluster
              through DSMEM; barrier = split arrive.release / wait.acquire (no L2 on the critical path)
  alternating one cuBLAS GEMM and one pointwise kernel per step: two dependent kernels, each paying the
              GPU-side gap between kernels and its own duration
The backward is the same with M = units, K = G*H (the gate gradients are exchanged, G times more bytes).
"""
from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..reference import GATES


@dataclass(frozen=True)
class Hopper:
    """H100 SXM constants. Sources: Luo et al., "Benchmarking and Dissecting the Nvidia Hopper GPU
    Architecture", IPDPS'24 (H800, same SM): L2 hit 263 cycles, DSMEM 180 cycles, mma.sync m16n8k16 ~33
    cycles latency and ~63% of the tensor peak; the HPEC'24 cluster paper (H100 PCIe): cluster.sync
    0.6-1.2 us, grid.sync 1.3-1.9 us; NVIDIA's H100 datasheet: 132 SMs, 3.35 TB/s HBM3, 989 TFLOP/s dense
    fp16. Marked "assumption": estimates of this file, to be replaced by the quick plan's measurements."""

    sms: int = 132
    smem_per_block: int = 227 * 1024
    cc_major: int = 9
    clock_ghz: float = 1.755              # sustained boost under load (max 1.98)
    l2_round_trip_cycles: int = 263       # Luo et al.
    dsmem_latency_cycles: int = 180       # Luo et al.
    mma_latency_cycles: int = 33          # Luo et al., m16n8k16 fp16
    mma_tflops_per_sm_16bit: float = 4.7  # 989 TFLOP/s / 132 SMs x 63% (mma.sync, not wgmma)
    l2_bandwidth_tb_s: float = 5.5        # assumption: aggregate L2 read bandwidth (microbenchmarks report 5.5-7)
    dsmem_bytes_per_cycle: float = 32.0   # assumption: per SM, remote shared-memory stores
    hbm_tb_s: float = 3.35
    sc_fence_us: float = 0.5              # assumption: MEMBAR.SC.GPU drains every outstanding access GPU-wide
    atomic_arrival_ns: float = 2.0        # assumption: serialised same-address atomics at one L2 slice
    cluster_split_barrier_us: float = 0.35  # assumption: below cluster.sync's 0.6 us (no SC fence, no L1 inval.)
    grid_skew_us: float = 0.1             # assumption: the last of many producers lands this much after the mean
    grid_skew_ns_per_cta: float = 1.0     # assumption: ...plus this per CTA (consumers check every producer)
    #                                       and the first lands as much before the mean (a symmetric spread)
    kernel_gap_us: float = 1.0            # assumption: GPU-side gap between two dependent kernels on a stream
    cublas_min_us: float = 2.5            # assumption: a latency-bound small cuBLAS GEMM
    pointwise_kernel_us: float = 1.5      # assumption: a small elementwise kernel, launch to completion
    launch_us: float = 3.0                # assumption: one (cooperative / cluster) launch with its setup
    pointwise_cycles: int = 140           # assumption: 4 items per thread, 5 MUFU transcendentals each
    reduce_cycles: int = 80               # assumption: split-K partials through shared memory + __syncthreads

    def us(self, cycles: float) -> float:
        return cycles / (self.clock_ghz * 1e3)


H100 = Hopper()
CUDNN_ANCHOR_US = {("lstm", 768, 16, "float16", "forward"): 1.96}  # FlashRNN's H100 figure (ANCHORS.md)


@dataclass
class Estimate:
    path: str
    per_step_us: float
    fixed_us: float
    parts: dict = field(default_factory=dict)
    plan: Optional[dict] = None
    refused: Optional[str] = None
    barrier: Optional[str] = None  # the grid exchange's design the estimate assumes (persistent path)

    def total_us(self, seq_len: int) -> float:
        return self.fixed_us + seq_len * self.per_step_us


PLAN_FIELDS = ("ctas", "groups", "units", "m_tiles", "warps_m", "warps_k", "k_padded", "chunk", "smem_bytes")


@functools.lru_cache(maxsize=4096)
def persistent_plan(path: str, cell: str, hidden: int, batch: int, dtype: torch.dtype, direction: str,
                    hw: Hopper = H100):
    """(reason, plan dict or None) of csrc/cuda's planner for an H100's limits (needs fusedrnn._C or _C_emu)."""
    from .._extension import has_emulated_cuda
    ops = torch.ops.fusedrnn
    op = getattr(ops, "cuda_rnn_persistent_plan", None) if hasattr(ops, "cuda_rnn_persistent_plan") else None
    if op is None:
        if not has_emulated_cuda():
            raise RuntimeError("the latency model needs csrc/cuda's planner: build fusedrnn with CUDA or with the "
                               "emulated backend (fusedrnn._C_emu)")
        op = ops.cuda_emu_rnn_persistent_plan
    try:
        why, plan = op(path, direction, cell, dtype, batch, hidden, [hw.sms, hw.smem_per_block, hw.cc_major])
    except RuntimeError as e:  # a call the kernels do not take at all (e.g. float64)
        return str(e), None
    return why, (dict(zip(PLAN_FIELDS, plan)) if not why else None)


def _elem(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.float32 else 2


# The grid exchange's synchronisation designs (step_estimate's `barrier`):
#   built   what csrc/cuda/rnn_persistent.cu does: "slices" where a CTA's slice is whole 16-byte pieces
#           (slices_stageable: units * element size % 16 == 0), else "flags"
#   slices  per-CTA step flags; each producer's slice staged as soon as its flag is acquired
#   flags   per-CTA step flags (a release store after MEMBAR.ALL.GPU, a relaxed poll, one acquire load), then
#           all of h staged after the last flag
#   sc      the grid barrier before issue #17: two SC fences, a central counter, a poll that invalidates L1
#   tag     not built: the step tag inside the published h (readers poll the data itself, no flag), at the
#           price of wider exchanged words
BARRIERS = ("built", "slices", "flags", "sc", "tag")


def slices_stageable(units: int, dtype: torch.dtype) -> bool:
    """csrc/cuda/rnn_persistent.cu's slices_stageable: a producer's slice of a row is whole 16-byte pieces."""
    return units * _elem(dtype) % 16 == 0


def step_estimate(path: str, cell: str, hidden: int, batch: int, dtype: torch.dtype, direction: str,
                  hw: Hopper = H100, barrier: str = "built") -> Estimate:
    """The estimate of one path (module doc); `barrier`: one of BARRIERS (the grid exchange's design)."""
    if barrier not in BARRIERS:
        raise ValueError(f"barrier must be one of {BARRIERS}, got {barrier!r}")
    G, elem = GATES[cell], _elem(dtype)
    H, B = hidden, batch
    backward = direction == "backward"
    if path == "alternating":
        # forward: GEMM [B, H] x [H, G*H]; backward: the same shape for grad h (the weight GEMMs are hoisted)
        flops = 2.0 * B * H * G * H
        peak = hw.sms * hw.mma_tflops_per_sm_16bit * (0.5 if dtype == torch.float32 else 1.0)
        gemm = max(hw.cublas_min_us, flops / (peak * 1e6))
        kernels = 2 if not backward else 3  # backward: pointwise + GEMM + the grad-h accumulation
        parts = {"gemm": gemm, "pointwise": hw.pointwise_kernel_us * (kernels - 1), "gaps": hw.kernel_gap_us * kernels}
        return Estimate(path, sum(parts.values()), 0.0, parts)
    why, plan = persistent_plan(path, cell, H, B, dtype, direction, hw)
    if why:
        return Estimate(path, math.inf, math.inf, refused=why)
    ctas, units, warps_k, k_padded, chunk = plan["ctas"], plan["units"], plan["warps_k"], plan["k_padded"], plan["chunk"]
    groups = plan["groups"]
    rows = units if backward else G * units                     # M of the CTA
    batch_per_group = math.ceil(B / groups)
    n_chunks = math.ceil(batch_per_group / chunk)
    n_padded = n_chunks * chunk
    k_per_mma = 8 if dtype == torch.float32 else 16
    rate = hw.mma_tflops_per_sm_16bit * (0.5 if dtype == torch.float32 else 1.0)
    flops = 2.0 * rows * k_padded * n_padded
    chain_cycles = n_chunks * (k_padded / (k_per_mma * warps_k)) * hw.mma_latency_cycles
    parts = {"mma": max(flops / (rate * 1e6), hw.us(chain_cycles))}
    if warps_k > 1:
        parts["reduce"] = hw.us(hw.reduce_cycles) * n_chunks
    parts["pointwise"] = hw.us(hw.pointwise_cycles) * n_chunks
    exchanged = batch_per_group * k_padded * elem                # bytes of h (or gate gradients) each CTA needs
    rt = hw.us(hw.l2_round_trip_cycles)
    if path == "persistent":
        if barrier == "built":
            barrier = "slices" if slices_stageable(units, dtype) else "flags"
        aggregate = ctas * groups * exchanged / (hw.l2_bandwidth_tb_s * 1e6)  # every CTA's stage, at L2 bandwidth
        skew = hw.grid_skew_us + ctas * hw.grid_skew_ns_per_cta * 1e-3
        if barrier == "sc":
            parts["barrier"] = 2 * hw.sc_fence_us + ctas * hw.atomic_arrival_ns * 1e-3 + 2 * rt
            parts["stage"] = rt + aggregate
        elif barrier in ("flags", "slices"):
            parts["publish"] = 1.5 * rt  # MEMBAR.ALL.GPU waits for the h stores' acks, then the flag store lands
            parts["wait"] = 2 * rt + skew  # the poll returns the last flag, then the acquire load
            if barrier == "flags":
                parts["stage"] = rt + aggregate
            else:  # the first chunk's slices load as the producers land, spread over 2 x skew; what does not fit
                # stays after, and later chunks (when a CTA's rows exceed one) are staged whole as before
                first = aggregate / n_chunks
                parts["stage"] = rt + max(0.0, first - 2 * skew) + (aggregate - first)
        else:  # tag: 3 16-bit values + a 16-bit tag per 64-bit word (fp32: one value + a 32-bit tag); the data
            # poll is per producer, so it overlaps like slices, with the wider words
            parts["publish"] = 0.5 * rt
            parts["wait"] = rt + skew
            wide = aggregate * (2.0 if elem == 4 else 4.0 / 3.0)
            parts["stage"] = 0.5 * rt + max(0.0, wide / n_chunks - 2 * skew) + wide * (n_chunks - 1) / n_chunks
    else:  # cluster: every CTA writes its slice into all CTAs of its cluster
        slice_bytes = batch_per_group * units * G ** (1 if backward else 0) * elem
        parts["publish"] = hw.us(hw.dsmem_latency_cycles + ctas * slice_bytes / hw.dsmem_bytes_per_cycle)
        parts["barrier"] = hw.cluster_split_barrier_us if barrier != "sc" else 0.6
    weight_bytes = G * H * H * elem
    fixed = hw.launch_us + weight_bytes / (hw.hbm_tb_s * 1e6)
    return Estimate(path, sum(parts.values()), fixed, parts, plan, barrier=barrier if path == "persistent" else None)


def estimates(cell: str, hidden: int, batch: int, dtype: torch.dtype, direction: str, hw: Hopper = H100,
              barrier: str = "built") -> dict:
    return {p: step_estimate(p, cell, hidden, batch, dtype, direction, hw, barrier)
            for p in ("cluster", "persistent", "alternating")}


def paths_by_model(cell: str, hidden: int, batch: int, seq_len: int, dtype: torch.dtype, direction: str,
                   hw: Hopper = H100) -> tuple[str, ...]:
    """Every path, fastest first by the model's fixed + T * per-step cost (refused ones last)."""
    est = estimates(cell, hidden, batch, dtype, direction, hw)
    return tuple(sorted(est, key=lambda p: (est[p].total_us(seq_len), p)))


# ---------------------------------------------------------------------------------------------------------
# The table (docs/latency_model.md) and one estimate explained
# ---------------------------------------------------------------------------------------------------------
def _fmt(e: Estimate) -> str:
    return "-" if e.refused else f"{e.per_step_us:.2f}"


def table(cells=("lstm", "gru"), hiddens=(256, 512, 768, 1024, 2048), batches=(1, 16, 64, 256),
          dtype=torch.float16, hw: Hopper = H100) -> str:
    lines = []
    for direction in ("forward", "backward"):
        for cell in cells:
            lines += [f"\n{cell.upper()} {str(dtype).replace('torch.', '')} {direction}: estimated us per step "
                      "(cluster / persistent / alternating; best at T=1024 in bold; - = the planner refuses)\n",
                      "| H \\ B | " + " | ".join(str(b) for b in batches) + " |",
                      "|---|" + "---|" * len(batches)]
            for H in hiddens:
                row = []
                for B in batches:
                    est = estimates(cell, H, B, dtype, direction, hw)
                    best = paths_by_model(cell, H, B, 1024, dtype, direction, hw)[0]
                    row.append(" / ".join(f"**{_fmt(est[p])}**" if p == best else _fmt(est[p])
                                          for p in ("cluster", "persistent", "alternating")))
                lines.append(f"| {H} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def explain(cell: str, hidden: int, batch: int, dtype: torch.dtype, direction: str, hw: Hopper = H100) -> str:
    out = [f"{cell} H={hidden} B={batch} {dtype} {direction} on an H100 (model, not a measurement):"]
    for barrier in BARRIERS:
        for p, e in estimates(cell, hidden, batch, dtype, direction, hw, barrier).items():
            if p != "persistent" and barrier != "built":
                continue
            if e.refused:
                out.append(f"  {p:<11} refused: {e.refused}")
                continue
            terms = " + ".join(f"{k} {v:.3f}" for k, v in e.parts.items())
            label = f"{p} [{barrier}{' = ' + e.barrier if barrier != e.barrier and e.barrier else ''}]" if p == "persistent" else p
            out.append(f"  {label:<30} {e.per_step_us:.2f} us/step = {terms}; once {e.fixed_us:.2f} us; plan {e.plan}")
    anchor = CUDNN_ANCHOR_US.get((cell, hidden, batch, str(dtype).replace("torch.", ""), direction))
    if anchor:
        out.append(f"  cuDNN (measured by FlashRNN on an H100): {anchor} us/step")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--explain", nargs=5, metavar=("CELL", "H", "B", "DTYPE", "DIRECTION"))
    args = ap.parse_args(argv)
    if args.explain:
        cell, H, B, dt, direction = args.explain
        print(explain(cell, int(H), int(B), getattr(torch, dt), direction))
    else:
        print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
