"""Backend "triton" of fusedrnn::beam_topk: kernels + launcher.

Semantics, tie rule and -inf/NaN policy: fusedrnn/reference_decoding.py. Two launches, no [B*K, V] tensor:

1. _beam_topk_partial, grid (B*K rows, NS vocab splits): one pass over its slice of the row in blocks of
   BLOCK: online max m / sum s of exp(x - m), a NaN/+inf flag, and the slice's top-KP candidates by
   (raw logit desc, token asc). A candidate is one uint64 key, ordered(x) << 32 | (2^32-1 - token), so
   "larger key" is exactly that order and one bitonic top-k (_topk) keeps it; a block whose best key
   can't enter the running list skips the sort.
2. _beam_topk_merge, grid (B,), a loop over the K beams: the beam's top-KP of its NS slices' keys (folded
   in one slice at a time) and its log-sum-exp; scores ((x - m) - log s) + beam score, folded into the
   running k best by the key ordered(score) << 32 | (2^32-1 - (beam*KP + rank)), i.e. (score desc, beam
   asc, row rank asc); NaN scores get the largest key so they rank first, like the reference. The row
   ranks' tokens go through a small [B*K, KP] scratch tensor, read back for the winners at the end.
   Folding instead of one [K, NS*KP] tile keeps compiled variants to (KP, BLOCK) and compile times to
   seconds (a [16, 16*64] tile took 76 s to compile for sm_90).

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

_U32 = tl.constexpr(0xFFFFFFFF)  # a plain global is not visible to compiled kernels; v ^ _U32 = 2^32-1 - v


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
    # compare-and-swap along hypercube axes nd-stage .. nd-1 (innermost last); expressions inline because a
    # name bound inside the loop would stop being a compile-time constant
    for jj in tl.static_range(stage):
        partner = tl.sum(h, axis=nd - stage + jj, keep_dims=True) - h
        is_right = tl.reshape(tl.arange(0, 2), [1] * (nd - stage + jj) + [2] + [1] * (stage - 1 - jj))
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
        key = (_ordered(xz).to(tl.uint64) << 32) | (idx.to(tl.int64) ^ _U32).to(tl.uint64)
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
def _beam_topk_merge(keys_ptr, m_ptr, s_ptr, bad_ptr, beam_ptr, tok_ptr, out_score_ptr, out_token_ptr,
                     out_parent_ptr, K, NS, k, KK, KP: tl.constexpr):
    b = tl.program_id(0)
    rank = tl.arange(0, KP)
    best = tl.zeros([KP], dtype=tl.uint64)
    for beam in range(0, K):
        row = (b * K + beam).to(tl.int64)
        # the beam's top-KP and log-sum-exp over its NS slices
        row_keys = tl.load(keys_ptr + row * NS * KP + rank)
        m = tl.load(m_ptr + row * NS)
        s = tl.load(s_ptr + row * NS)
        bad = tl.load(bad_ptr + row * NS)
        for j in range(1, NS):
            part = row * NS + j
            row_keys = _topk(tl.reshape(tl.join(row_keys, tl.load(keys_ptr + part * KP + rank)), [2 * KP]), KP)
            m_j = tl.load(m_ptr + part)
            m_new = tl.maximum(m, m_j)
            m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - m_ref) + tl.load(s_ptr + part) * tl.exp(m_j - m_ref)
            m = m_new
            bad = tl.maximum(bad, tl.load(bad_ptr + part))
        dead = m == -float("inf")
        m_safe = tl.where(dead, 0.0, m)
        log_s = tl.log(tl.where(dead, 1.0, s))
        beam_score = tl.load(beam_ptr + row)
        poisoned = (bad > 0) | (beam_score != beam_score) | (beam_score == float("inf"))

        x = _unordered((row_keys >> 32).to(tl.uint32))
        token = ((row_keys & _U32) ^ _U32).to(tl.int64)
        token = tl.where(poisoned, rank.to(tl.int64), token)
        tl.store(tok_ptr + row * KP + rank, token)
        score = ((x - m_safe) - log_s) + beam_score
        score = tl.where(dead, -float("inf"), score)
        score = tl.where(score == 0.0, 0.0, score)
        sord = tl.where(poisoned, _U32, _ordered(score))
        slot = beam * KP + rank
        fkey = (sord.to(tl.uint64) << 32) | (slot.to(tl.int64) ^ _U32).to(tl.uint64)
        fkey = tl.where(rank < KK, fkey, 0)
        best = _topk(tl.reshape(tl.join(best, fkey), [2 * KP]), KP)

    tl.debug_barrier()  # the tokens stored above by other threads
    sel = ((best & _U32) ^ _U32).to(tl.int32)
    parent = sel // KP
    out_token = tl.load(tok_ptr + (b * K + parent).to(tl.int64) * KP + sel % KP)
    out_score = _unordered((best >> 32).to(tl.uint32))
    omask = rank < k
    tl.store(out_score_ptr + b * k + rank, out_score, mask=omask)
    tl.store(out_token_ptr + b * k + rank, out_token, mask=omask)
    tl.store(out_parent_ptr + b * k + rank, parent.to(tl.int64), mask=omask)


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
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    bs = beam_scores.reshape(R).to(torch.float32).contiguous()
    BLOCK = block or max(KP, min(1024, triton.next_power_of_2(V)))
    assert BLOCK >= KP and BLOCK & (BLOCK - 1) == 0
    # Vocab splits: enough programs to fill the GPU (~4 per SM) with slices of >= 4 blocks; the merge folds
    # the slices one by one (a KP-from-2KP top-k each), so only KP and BLOCK select a compiled variant.
    ns = max(1, min(triton.cdiv(4 * _num_sms(x.device), R), triton.cdiv(V, 4 * BLOCK)))
    if num_splits is not None:
        ns = num_splits
    chunk = triton.cdiv(triton.cdiv(V, ns), BLOCK) * BLOCK
    ns = triton.cdiv(V, chunk)

    dev = x.device
    keys = torch.empty(R, ns, KP, dtype=torch.uint64, device=dev)
    pm = torch.empty(R, ns, dtype=torch.float32, device=dev)
    ps = torch.empty(R, ns, dtype=torch.float32, device=dev)
    pbad = torch.empty(R, ns, dtype=torch.int32, device=dev)
    _beam_topk_partial[(R, ns)](x, x.stride(0), V, chunk, keys, pm, ps, pbad, KP=KP, BLOCK=BLOCK,
                                num_warps=4)
    row_tokens = torch.empty(R, KP, dtype=torch.int64, device=dev)
    scores = torch.empty(B, k, dtype=torch.float32, device=dev)
    tokens = torch.empty(B, k, dtype=torch.int64, device=dev)
    parents = torch.empty(B, k, dtype=torch.int64, device=dev)
    _beam_topk_merge[(B,)](keys, pm, ps, pbad, bs, row_tokens, scores, tokens, parents, K, ns, k, min(k, V),
                           KP=KP, num_warps=4)
    return scores, tokens, parents
