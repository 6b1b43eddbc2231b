"""Backend "triton" of fusedrnn::beam_topk: kernels + launcher.

Semantics, tie rule and -inf/NaN policy: fusedrnn/reference_decoding.py. Two launches, no [B*K, V] tensor:

1. _beam_topk_partial, grid (B*K rows, NS vocab splits): one pass over its slice of the row in blocks of
   BLOCK: online max m / sum s of exp(x - m), a NaN/+inf flag, and the slice's top-KP candidates by
   (raw logit desc, token asc). A candidate is one uint64 key, ordered(x) << 32 | (2^32-1 - token), so
   "larger key" is exactly that order and one tl.topk keeps it; a block whose best key can't enter the
   running list skips the sort.
2. _beam_topk_merge, grid (B,): per beam, the top-KP of its NS slices' keys and its log-sum-exp; scores
   ((x - m) - log s) + beam score; then the k best of the K*KP candidates by the key
   ordered(score) << 32 | (2^32-1 - (beam*KP + rank)), i.e. (score desc, beam asc, row rank asc); NaN
   scores get the largest key so they rank first, like the reference.

ordered(x) maps fp32 bits to uint32 monotonically (negatives: all bits flipped; positives: sign bit set);
-0.0 is first made +0.0 so the two tie. Empty slots have key 0, below every real key (ordered(-inf) > 0).
Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (slowly: keep V small there).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference_decoding import MAX_KERNEL_K

_U32 = 0xFFFFFFFF


@triton.jit
def _ordered(x):
    """fp32 -> uint32, monotone (x < y  <=>  ordered(x) < ordered(y)); -0.0 must be normalised first."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _unordered(o):
    """Inverse of _ordered."""
    bits = tl.where((o >> 31) != 0, o ^ 0x80000000, o ^ 0xFFFFFFFF)
    return bits.to(tl.float32, bitcast=True)


# ---------------------------------------------------------------------------------------------------
# Bitonic top-k along the last axis: triton.language.standard.sort_impl with one change. tl.topk finds a
# compare-and-swap partner with xor_sum, a reduce with a custom combine that Triton's interpreter runs
# element by element in Python (10.6 s for one 8 x 1000 call); the partner is also sum(pair) - x (uint64
# wraps exactly), and tl.sum runs as one numpy call there. Same network on the GPU.
# ---------------------------------------------------------------------------------------------------
@triton.constexpr_function
def _log2(n):
    return n.bit_length() - 1


@triton.jit
def _bitonic_merge(h, stage: tl.constexpr, alternate: tl.constexpr, nd: tl.constexpr):
    """Merges the bitonic runs of 2**stage elements of the [2] * nd hypercube h: descending, or with
    alternating directions (the input of the next, longer merge)."""
    if alternate:
        flip = tl.reshape(tl.arange(0, 2), [1] * (nd - stage - 1) + [2] + [1] * stage)
    else:
        flip = 1
    for jj in tl.static_range(stage):
        j: tl.constexpr = stage - 1 - jj
        partner = tl.sum(h, axis=nd - 1 - j, keep_dims=True) - h
        is_right = tl.reshape(tl.arange(0, 2), [1] * (nd - j - 1) + [2] + [1] * j)
        h = tl.where((h > partner) != (flip ^ is_right), partner, h)
    return h


@triton.jit
def _topk(x, k: tl.constexpr):
    """The k largest along the last axis, largest first (sizes are powers of 2)."""
    log_k: tl.constexpr = _log2(k)
    log_n: tl.constexpr = _log2(x.shape[-1])
    n_dims: tl.constexpr = _log2(x.numel)
    h = tl.reshape(x, [2] * n_dims)
    for i in tl.static_range(1, log_k + 1):  # sort runs of k
        h = _bitonic_merge(h, i, i < log_n, n_dims)
    for i in tl.static_range(log_k + 1, log_n + 1):  # halve: the larger of two sorted runs, re-sort
        h = tl.max(h, axis=n_dims - (i - log_k) - log_k)
        h = _bitonic_merge(h, log_k, i < log_n, n_dims - (i - log_k))
    return tl.reshape(h, x.shape[:-1] + [k])


@triton.jit
def _beam_topk_partial(x_ptr, row_stride, V, chunk, keys_ptr, m_ptr, s_ptr, bad_ptr,
                       KP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    x_row = x_ptr + row.to(tl.int64) * row_stride

    m = -float("inf")
    s = 0.0
    bad = 0
    best = tl.zeros([KP], dtype=tl.uint64)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < end
        x = tl.load(x_row + idx, mask=mask, other=-float("inf")).to(tl.float32)
        is_bad = (x != x) | (x == float("inf"))
        bad = tl.maximum(bad, tl.max(is_bad.to(tl.int32), axis=0))
        xc = tl.where(is_bad, -float("inf"), x)
        m_new = tl.maximum(m, tl.max(xc, axis=0))
        # while nothing finite has been seen (m_new = -inf) s stays 0; shifting by 0 then avoids -inf - -inf
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(xc - m_ref), axis=0)
        m = m_new

        xz = tl.where(x == 0.0, 0.0, x)
        key = (_ordered(xz).to(tl.uint64) << 32) | (_U32 - idx.to(tl.int64)).to(tl.uint64)
        key = tl.where(mask, key, 0)
        if tl.max(key, axis=0) > tl.min(best, axis=0):
            block_top = _topk(key, KP)
            best = _topk(tl.reshape(tl.join(best, block_top), [2 * KP]), KP)

    part = row * num_splits + split
    tl.store(keys_ptr + part.to(tl.int64) * KP + tl.arange(0, KP), best)
    tl.store(m_ptr + part, m)
    tl.store(s_ptr + part, s)
    tl.store(bad_ptr + part, bad)


@triton.jit
def _beam_topk_merge(keys_ptr, m_ptr, s_ptr, bad_ptr, beam_ptr, out_score_ptr, out_token_ptr, out_parent_ptr,
                     K, NS, k, KK, KB: tl.constexpr, NSP: tl.constexpr, KP: tl.constexpr):
    b = tl.program_id(0)
    beams = tl.arange(0, KB)
    beam_ok = beams < K
    rows = (b * K + beams).to(tl.int64)

    # each beam's top-KP over its NS slices (slice j holds columns j*KP .. j*KP+KP-1)
    cols = tl.arange(0, NSP * KP)
    keys = tl.load(keys_ptr + rows[:, None] * (NS * KP) + cols[None, :],
                   mask=beam_ok[:, None] & (cols[None, :] < NS * KP), other=0)
    row_keys = _topk(keys, KP)  # [KB, KP], best first

    # each beam's log-sum-exp from its slices' (m, s)
    splits = tl.arange(0, NSP)
    pmask = beam_ok[:, None] & (splits[None, :] < NS)
    pm = tl.load(m_ptr + rows[:, None] * NS + splits[None, :], mask=pmask, other=-float("inf"))
    ps = tl.load(s_ptr + rows[:, None] * NS + splits[None, :], mask=pmask, other=0.0)
    pbad = tl.load(bad_ptr + rows[:, None] * NS + splits[None, :], mask=pmask, other=0)
    m = tl.max(pm, axis=1)
    dead = m == -float("inf")
    m_safe = tl.where(dead, 0.0, m)
    s = tl.sum(tl.where(pm == -float("inf"), 0.0, ps * tl.exp(pm - m_safe[:, None])), axis=1)
    log_s = tl.log(tl.where(dead, 1.0, s))
    beam_score = tl.load(beam_ptr + rows, mask=beam_ok, other=0.0)
    poisoned = (tl.max(pbad, axis=1) > 0) | (beam_score != beam_score) | (beam_score == float("inf"))

    rank = tl.arange(0, KP)
    x = _unordered((row_keys >> 32).to(tl.uint32))
    token = (_U32 - (row_keys & _U32)).to(tl.int64)
    token = tl.where(poisoned[:, None], rank[None, :].to(tl.int64), token)
    score = ((x - m_safe[:, None]) - log_s[:, None]) + beam_score[:, None]
    score = tl.where(dead[:, None], -float("inf"), score)
    score = tl.where(score == 0.0, 0.0, score)
    sord = tl.where(poisoned[:, None], _U32, _ordered(score))
    slot = beams[:, None] * KP + rank[None, :]
    fkey = (sord.to(tl.uint64) << 32) | (_U32 - slot.to(tl.int64)).to(tl.uint64)
    fkey = tl.where(beam_ok[:, None] & (rank[None, :] < KK), fkey, 0)

    top = _topk(tl.reshape(fkey, [KB * KP]), KP)
    sel = (_U32 - (top & _U32)).to(tl.int32)
    out_token = tl.gather(tl.reshape(token, [KB * KP]), sel, 0)
    out_score = _unordered((top >> 32).to(tl.uint32))
    o = tl.arange(0, KP)
    omask = o < k
    tl.store(out_score_ptr + b * k + o, out_score, mask=omask)
    tl.store(out_token_ptr + b * k + o, out_token, mask=omask)
    tl.store(out_parent_ptr + b * k + o, (sel // KP).to(tl.int64), mask=omask)


def unavailable_reason(device: torch.device):
    """Why the Triton kernels cannot run on `device`, or None."""
    interpreted = "Interpret" in type(_beam_topk_partial).__name__
    if device.type == "cuda":
        return "triton was imported in interpreter mode (TRITON_INTERPRET=1)" if interpreted else None
    if device.type == "cpu":
        if interpreted:
            return None
        return ("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing fusedrnn "
                f"(it is {os.environ.get('TRITON_INTERPRET', 'unset')})")
    return f"runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device.type}"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def beam_topk_triton(logits: torch.Tensor, beam_scores: torch.Tensor, k: int, num_beams: int,
                     num_splits: int | None = None, block: int | None = None):
    """Launcher; arguments as fusedrnn.ops.beam_topk, already validated (num_beams > 0, k <= 128).
    num_splits / block override the vocab split count and block size (tests use them to reach the
    multi-split, multi-block paths at interpreter-sized V)."""
    R, V = logits.shape
    K = num_beams
    B = R // K
    assert 1 <= k <= MAX_KERNEL_K and k <= K * V
    KP = max(16, triton.next_power_of_2(k))
    KB = triton.next_power_of_2(K)
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    bs = beam_scores.reshape(R).to(torch.float32).contiguous()
    BLOCK = block or max(KP, min(1024, triton.next_power_of_2(V)))
    assert BLOCK >= KP and BLOCK & (BLOCK - 1) == 0
    # Vocab splits: enough programs to fill the GPU (~4 per SM), slices of >= 4 blocks, and the merge's
    # [KB, NSP*KP] key tile capped at 16k keys (128 KB of uint64 per program).
    ns = max(1, min(triton.cdiv(4 * _num_sms(x.device), R), triton.cdiv(V, 4 * BLOCK)))
    ns = min(ns, max(1, 16384 // (KB * KP)))
    if num_splits is not None:
        ns = num_splits
    chunk = triton.cdiv(triton.cdiv(V, ns), BLOCK) * BLOCK
    ns = triton.cdiv(V, chunk)
    NSP = triton.next_power_of_2(ns)

    dev = x.device
    keys = torch.empty(R, ns, KP, dtype=torch.uint64, device=dev)
    pm = torch.empty(R, ns, dtype=torch.float32, device=dev)
    ps = torch.empty(R, ns, dtype=torch.float32, device=dev)
    pbad = torch.empty(R, ns, dtype=torch.int32, device=dev)
    _beam_topk_partial[(R, ns)](x, x.stride(0), V, chunk, keys, pm, ps, pbad, KP=KP, BLOCK=BLOCK,
                                num_warps=4)
    scores = torch.empty(B, k, dtype=torch.float32, device=dev)
    tokens = torch.empty(B, k, dtype=torch.int64, device=dev)
    parents = torch.empty(B, k, dtype=torch.int64, device=dev)
    _beam_topk_merge[(B,)](keys, pm, ps, pbad, bs, scores, tokens, parents, K, ns, k, min(k, V),
                           KB=KB, NSP=NSP, KP=KP, num_warps=4)
    return scores, tokens, parents
