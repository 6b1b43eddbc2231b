"""The decoding spec: readable PyTorch for beam_topk, logit filtering and a one-item beam search.

Every fast path (fusedrnn.ops.beam_topk on the cpu / triton / cuda backends, fusedrnn.decoding) is tested
against these functions, and beam_topk_reference is the "reference" backend of fusedrnn::beam_topk.

beam_topk(logits [B*K, V], beam_scores [B*K] or [B, K], k, num_beams) -> (scores [B, k], tokens [B, k],
parents [B, k]): rows b*K .. b*K+K-1 are the K beams of batch item b. The candidate (beam r, token t) of
item b scores

    score = ((x - m) - log(s)) + beam_scores[b*K + r]      x = logits[b*K + r, t], m = max of the row,
                                                            s = sum over the row of exp(x_j - m)

(log_softmax(row)[t] + beam score) computed in fp32 (fp64 for fp64 logits; fp16/bf16 logits are upcast),
and the k best of the K*V candidates of item b are returned best first.

ORDER (the tie rule). Candidates are ordered by
    1. score, larger first; NaN ranks above every number (as torch.sort / torch.topk);
    2. then the lower parent beam r;
    3. then the larger raw logit x (this only matters when two different logits of one row round to the
       same fp32 score);
    4. then the lower token t.
Equal logits of one row have equal scores, so in practice ties go to the lowest flattened index r*V + t.
Rule 3 makes the order the same as "per row, by raw logit" -- what lets a kernel take each row's top-k on
raw logits before knowing the row's log-sum-exp, with no exception for rounding.

SPECIAL VALUES (per row r):
    -inf logits    are ordinary candidates scoring -inf (they rank last, by rules 2-4 among themselves).
    all -inf       the row is dead: every candidate scores -inf (no NaN from -inf - -inf).
    beam score -inf  (a dead beam, e.g. beams 1..K-1 at the first step) every candidate scores -inf.
    NaN or +inf    in the row's logits, or a NaN / +inf beam score, poisons the row: every candidate of the
                   row scores NaN, so by rule 1 its tokens 0, 1, ... come out first with NaN scores --
                   the corruption is visible in the output instead of silently masked. (torch's
                   log_softmax also turns such a row into NaN.)
k: 1 <= k <= K*V. k > V is fine (each row contributes all V tokens); k > K*V raises ValueError because
there are not k candidates. Kernels support k <= 128 (MAX_KERNEL_K); the reference and C++ any k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor

MAX_KERNEL_K = 128
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_beam_topk_args(logits: Tensor, beam_scores: Tensor, k: int, num_beams: int) -> tuple[int, int, int]:
    """Validates the arguments of beam_topk and returns (B, K, V). num_beams=0 takes K from a 2-D
    beam_scores [B, K]."""
    if logits.dim() != 2:
        raise ValueError(f"beam_topk: logits must be 2-D [batch*beams, vocab], got shape {list(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"beam_topk: logits must be float16/bfloat16/float32/float64, got {logits.dtype}")
    if not beam_scores.is_floating_point():
        raise ValueError(f"beam_topk: beam_scores must be a float tensor, got {beam_scores.dtype}")
    R, V = logits.shape
    if num_beams <= 0:
        if beam_scores.dim() != 2:
            raise ValueError("beam_topk: give num_beams, or beam_scores as a 2-D [batch, beams] tensor; got "
                             f"beam_scores of shape {list(beam_scores.shape)} and num_beams={num_beams}")
        num_beams = beam_scores.shape[1]
    if num_beams <= 0 or R % num_beams != 0:
        raise ValueError(f"beam_topk: logits has {R} rows, not a multiple of num_beams={num_beams}")
    if beam_scores.numel() != R:
        raise ValueError(f"beam_topk: beam_scores has {beam_scores.numel()} elements, logits has {R} rows")
    if beam_scores.device != logits.device:
        raise ValueError(f"beam_topk: beam_scores on {beam_scores.device}, logits on {logits.device}")
    if V == 0 or R == 0:
        raise ValueError(f"beam_topk: empty logits of shape {list(logits.shape)}")
    if not 1 <= k <= num_beams * V:
        raise ValueError(f"beam_topk: k={k} must be in [1, num_beams*vocab] = [1, {num_beams * V}]: "
                         f"there are only {num_beams * V} candidates per batch item")
    return R // num_beams, num_beams, V


def score_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """Scores are fp32 for fp16/bf16/fp32 logits, fp64 for fp64 logits."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def beam_topk_reference(logits: Tensor, beam_scores: Tensor, k: int, num_beams: int = 0
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """The spec of fusedrnn::beam_topk (module doc). Materialises [B*K, V] scores; any device."""
    B, K, V = check_beam_topk_args(logits, beam_scores, k, num_beams)
    acc = score_dtype(logits.dtype)
    x = logits.to(acc)
    b = beam_scores.reshape(-1).to(acc)
    poisoned = torch.isnan(x).any(1) | torch.isposinf(x).any(1) | torch.isnan(b) | torch.isposinf(b)
    x = x.masked_fill(poisoned[:, None], 0.0)
    m = x.amax(1)
    dead = m == -math.inf
    m = torch.where(dead, torch.zeros_like(m), m)
    shifted = x - m[:, None]
    # s in fp64: identical rows get identical constants whatever the reduction order (a tie between two
    # identical beams must be a tie).
    log_s = shifted.double().exp().sum(1).log().to(acc)
    score = (shifted - log_s[:, None]) + b[:, None]
    score = torch.where(dead[:, None], torch.full_like(score, -math.inf), score)
    score = torch.where(poisoned[:, None], torch.full_like(score, math.nan), score)

    # The ORDER, by stable sorts from the least significant key: start in flattened order (beam asc,
    # token asc), then raw logit desc, then beam asc, then score desc with NaN first. Real scores are
    # < +inf (x <= m, s >= 1, beam score < +inf), so +inf can stand for NaN.
    flat_score = score.reshape(B, K * V)
    flat_x = x.reshape(B, K * V)
    beam_of = torch.arange(K, device=x.device).repeat_interleave(V).expand(B, K * V)
    order = torch.sort(flat_x, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(beam_of.gather(1, order), dim=1, stable=True).indices)
    key = torch.where(torch.isnan(flat_score), torch.full_like(flat_score, math.inf), flat_score)
    order = order.gather(1, torch.sort(key.gather(1, order), dim=1, descending=True, stable=True).indices)
    top = order[:, :k]
    return flat_score.gather(1, top), top % V, top // V


# ---------------------------------------------------------------------------------------------------
# Logit filtering for sampling (Hugging Face semantics).
# ---------------------------------------------------------------------------------------------------
def check_filter_args(logits: Tensor, temperature: float, top_k: int, top_p: float, min_tokens_to_keep: int):
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got {list(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits must be float16/bfloat16/float32/float64, got {logits.dtype}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite float > 0 (use greedy_search for temperature 0), "
                         f"got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k}")
    if not (isinstance(top_p, (int, float)) and 0.0 <= top_p <= 1.0):
        raise ValueError(f"top_p must be a float in [0, 1] (1 disables it), got {top_p}")
    if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep must be an int >= 1, got {min_tokens_to_keep}")


def filter_logits_reference(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                            min_tokens_to_keep: int = 1) -> Tensor:
    """The spec of fusedrnn.decoding.filter_logits, one row at a time.

    Returns logits / temperature (fp32; fp64 for fp64 input) with the removed tokens set to -inf:
      1. temperature: x = logits / temperature, computed in fp32 (fp16 logits cannot overflow).
      2. top-k (top_k > 0): kk = min(max(top_k, min_tokens_to_keep), V); remove x < (kk-th largest x),
         so every token tied with the kk-th is kept.
      3. top-p (top_p < 1): p = softmax(x) over the tokens left by 2, tokens ordered by x descending, ties
         by lower index; a token is kept iff the mass of the tokens before it is < top_p (the smallest
         prefix with mass >= top_p), and the first min_tokens_to_keep are always kept.
    -inf logits stay -inf and never produce NaN; NaN / +inf logits are rejected (ValueError).
    """
    check_filter_args(logits, temperature, top_k, top_p, min_tokens_to_keep)
    acc = score_dtype(logits.dtype)
    rows = logits.reshape(-1, logits.shape[-1]).to(acc)
    if torch.isnan(rows).any() or torch.isposinf(rows).any():
        raise ValueError("filter_logits: logits contain NaN or +inf")
    out = []
    for row in rows:
        V = row.numel()
        x = row / temperature
        if top_k > 0:
            kk = min(max(top_k, min_tokens_to_keep), V)
            threshold = torch.sort(x, descending=True).values[kk - 1]
            x = torch.where(x < threshold, torch.full_like(x, -math.inf), x)
        if top_p < 1.0:
            order = torch.sort(x, descending=True, stable=True).indices
            probs = torch.softmax(x, 0)[order].double()
            before = torch.cumsum(probs, 0) - probs
            keep_sorted = before < top_p
            keep_sorted[:min_tokens_to_keep] = True
            keep = torch.zeros(V, dtype=torch.bool, device=x.device)
            keep[order] = keep_sorted
            x = torch.where(keep, x, torch.full_like(x, -math.inf))
        out.append(x)
    return torch.stack(out).reshape(logits.shape)


# ---------------------------------------------------------------------------------------------------
# One-item beam search, hypothesis by hypothesis: the spec of fusedrnn.decoding.beam_search.
# ---------------------------------------------------------------------------------------------------
def length_penalty(length: int, alpha: float, style: str = "power") -> float:
    """The divisor of a hypothesis' summed log-prob: length**alpha ("power", HF/fairseq) or
    ((5 + length) / 6)**alpha ("gnmt", Wu et al. 2016). length counts generated tokens, EOS included."""
    if style == "power":
        return float(length) ** alpha
    if style == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    raise ValueError(f"length_penalty_style must be 'power' or 'gnmt', got {style!r}")


@dataclass
class Hypothesis:
    tokens: tuple
    score: float       # sum of log-probs / length_penalty(len(tokens))
    log_prob: float    # sum of log-probs
    finished: bool     # ended with EOS (False: cut at max_length)


def beam_search_reference(logits_fn: Callable[[tuple], Tensor], beam_size: int, max_length: int,
                          eos_token_id: int, min_length: int = 0, length_penalty_alpha: float = 1.0,
                          length_penalty_style: str = "power",
                          early_stopping: Union[bool, str] = False) -> list[Hypothesis]:
    """Beam search for one item; logits_fn(prefix: tuple of generated tokens) -> logits [V].

    Rules (fusedrnn.decoding.beam_search implements them batched):
      - K = beam_size beams; at the start beam 0 is the empty prefix with score 0 and beams 1..K-1 are
        dead (-inf), so the first step expands one prefix.
      - each step: candidates = beam_topk over the K live beams with k = 2K; EOS is masked while the
        hypothesis would be shorter than min_length (probability 0, the others not renormalised). An EOS candidate of rank < K with a finite score
        becomes a finished hypothesis (length = step + 1, EOS included); EOS candidates of rank >= K are
        dropped. The first K non-EOS candidates in rank order are the next live beams.
      - finished hypotheses: the K best by penalised score are kept; ties keep the one finished earlier
        (lower step, then lower rank).
      - after each step the item is done when it has K finished hypotheses and
          early_stopping=True    always;
          early_stopping=False   the best live beam penalised at its current length can't beat the worst
                                 kept hypothesis (Hugging Face's heuristic);
          early_stopping="never" no continuation of the best live beam can beat it, whatever its final
                                 length (exact: log-probs <= 0, so its best is sum / max lp over lengths);
        or when no live beam has a finite score.
      - at max_length, an item that is not done adds its live beams (finite scores) as unfinished
        hypotheses of length max_length, after that step's EOS hypotheses.
    Returns the kept hypotheses, best first (at most K).
    """
    K = beam_size
    # live: list of (log_prob, tokens), K entries, dead ones at -inf
    live = [(0.0, ())] + [(-math.inf, ())] * (K - 1)
    kept: list[tuple[float, int, Hypothesis]] = []  # (score, insertion order, hyp)
    order = 0

    def add(h: Hypothesis):
        nonlocal order
        kept.append((h.score, order, h))
        order += 1
        kept.sort(key=lambda e: (-e[0], e[1]))
        del kept[K:]

    def lp(n):
        return length_penalty(n, length_penalty_alpha, length_penalty_style)

    for t in range(max_length):
        logits = torch.stack([logits_fn(tokens) for _, tokens in live])
        acc = score_dtype(logits.dtype)
        beam = torch.tensor([s for s, _ in live], dtype=torch.float64).to(acc)
        if t + 1 < min_length:
            # EOS gets probability 0 but the others keep theirs (no renormalisation): beam_topk
            # normalises over what it is given, so add log(1 - p(EOS)) to the beam scores
            masked = logits.clone()
            masked[:, eos_token_id] = -math.inf
            beam = beam + (torch.logsumexp(masked.to(acc), 1) - torch.logsumexp(logits.to(acc), 1))
            logits = masked
        scores, tokens, parents = beam_topk_reference(logits, beam, 2 * K, K)
        scores, tokens, parents = scores[0].tolist(), tokens[0].tolist(), parents[0].tolist()
        nxt = []
        for rank, (s, tok, par) in enumerate(zip(scores, tokens, parents)):
            seq = live[par][1] + (tok,)
            if tok == eos_token_id:
                if rank < K and math.isfinite(s):
                    add(Hypothesis(seq, s / lp(t + 1), s, True))
            elif len(nxt) < K:
                nxt.append((s, seq))
        live = nxt
        best = live[0][0]
        if best == -math.inf:
            done = True
        elif len(kept) < K:
            done = False
        elif early_stopping is True:
            done = True
        elif early_stopping == "never":
            if t + 1 == max_length:
                done = False
            else:
                lengths = (max_length,) if length_penalty_alpha >= 0 else (t + 2,)
                done = kept[-1][0] >= best / max(lp(n) for n in lengths)
        else:
            done = kept[-1][0] >= best / lp(t + 1)
        if done:
            break
        if t + 1 == max_length:
            for s, seq in live:
                if math.isfinite(s):
                    add(Hypothesis(seq, s / lp(max_length), s, False))
    return [h for _, _, h in kept]
