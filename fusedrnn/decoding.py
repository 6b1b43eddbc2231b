"""Decoding: batched beam search, greedy search and top-k / top-p sampling for any step function.

    step(tokens [N], state) -> (logits [N, V], new_state)

`tokens` holds the last token of each of the N sequences (the start tokens at the first step); `state`
is whatever the model carries (a tensor, or nested tuples/lists/dicts of tensors, with the sequences along
dim 0), and is reordered between steps with `reorder_state(state, index)` (default: index_select(0, index)
on every tensor leaf). Give your own `reorder_state` for other layouts (e.g. an LSTM's [layers, N, H]).

Beam search selects candidates with fusedrnn.ops.beam_topk (log_softmax + beam score + top-2K in one pass
over the logits, no [N, V] log-prob tensor); all bookkeeping is batched tensor work, no per-hypothesis
Python loop. Items that are done leave the batch (their rows are dropped from `state`), and every
decision is made per item, so results do not depend on what else is in the batch. The rules are those
of fusedrnn.reference_decoding.beam_search_reference (the spec, one item at a time):

  - lengths count generated tokens, EOS included; the prompt / start token is not counted;
  - min_length masks EOS while the hypothesis would be shorter, without renormalising the other tokens'
    probabilities (scores stay the model's log-probs, as in Hugging Face and fairseq); max_length bounds
    the generated length;
  - 2K candidates per step; an EOS candidate finalises a hypothesis only if it ranks < K (fairseq /
    FasterTransformer); the first K non-EOS candidates continue;
  - the K best finished hypotheses are kept by score = log_prob / length_penalty(length), with
    length_penalty = length**alpha ("power") or ((5 + length) / 6)**alpha ("gnmt"); ties keep the one
    finished first;
  - early_stopping: True (stop at K finished), False (Hugging Face's heuristic: stop when the best live
    beam, penalised at its current length, can't beat the worst kept) or "never" (stop only when no
    continuation can beat it -- exact);
  - at max_length, an item not done adds its live beams as unfinished hypotheses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from . import ops
from .reference_decoding import check_filter_args, length_penalty, score_dtype

__all__ = ["beam_search", "greedy_search", "sample", "filter_logits", "reorder_state", "BeamSearchOutput",
           "GreedySearchOutput"]

StepFn = Callable[[Tensor, Any], tuple]


def reorder_state(state: Any, index: Tensor) -> Any:
    """index_select(0, index) on every tensor of a (nested tuple / list / dict of) tensor state; other
    leaves (None, numbers) are returned unchanged."""
    if isinstance(state, Tensor):
        return state.index_select(0, index.to(state.device))
    if isinstance(state, dict):
        return type(state)((key, reorder_state(value, index)) for key, value in state.items())
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # namedtuple
        return type(state)(*(reorder_state(value, index) for value in state))
    if isinstance(state, (tuple, list)):
        return type(state)(reorder_state(value, index) for value in state)
    return state


_default_reorder = reorder_state  # the parameter of the same name below shadows it


def _start_tokens(start_tokens: Union[Tensor, Sequence[int]]) -> Tensor:
    tokens = torch.as_tensor(start_tokens)
    if tokens.dim() != 1 or tokens.numel() == 0 or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"start_tokens must be a non-empty 1-D integer tensor [batch], got {tuple(tokens.shape)} "
                         f"{tokens.dtype}")
    return tokens.long()


def _call_step(step: StepFn, tokens: Tensor, state: Any, rows: int) -> tuple[Tensor, Any]:
    out = step(tokens, state)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError("step(tokens, state) must return (logits [N, V], new_state)")
    logits, state = out
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != rows:
        raise ValueError(f"step returned logits of shape {getattr(logits, 'shape', None)}, expected [{rows}, V]")
    return logits, state


def _mask_eos(logits: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """EOS masked for min_length without renormalising (as Hugging Face and fairseq: scores stay the
    model's log-probs): the masked logits, and log(1 - p(EOS)) per row [N] to add to the beam scores --
    beam_topk normalises over the row it is given."""
    masked = logits.index_fill(1, torch.tensor([eos_token_id], device=logits.device), -math.inf)
    acc = score_dtype(logits.dtype)
    return masked, torch.logsumexp(masked.to(acc), 1) - torch.logsumexp(logits.to(acc), 1)


# ---------------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------------
@dataclass
class BeamSearchOutput:
    """n = num_return_sequences best hypotheses per item, best first. Slots with no hypothesis (only
    possible when fewer than n have a finite score) have score -inf, length 0 and pad tokens."""

    sequences: Tensor  # [B, n, L] int64: generated tokens (EOS included), then pad_token_id; L = max length
    lengths: Tensor    # [B, n] int64: generated tokens, EOS included
    scores: Tensor     # [B, n] float64: log_prob / length_penalty(length)
    log_probs: Tensor  # [B, n] float64: sum of the tokens' log-probs
    finished: Tensor   # [B, n] bool: ended with EOS (False: cut at max_length)


def _check_beam_args(beam_size, max_length, eos_token_id, min_length, length_penalty_style, early_stopping,
                     num_return_sequences):
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be an int >= 1, got {beam_size}")
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an int >= 1, got {max_length}")
    if not isinstance(min_length, int) or not 0 <= min_length <= max_length:
        raise ValueError(f"min_length must be an int in [0, max_length={max_length}], got {min_length}")
    if not isinstance(eos_token_id, int) or eos_token_id < 0:
        raise ValueError(f"eos_token_id must be an int >= 0, got {eos_token_id}")
    if length_penalty_style not in ("power", "gnmt"):
        raise ValueError(f"length_penalty_style must be 'power' or 'gnmt', got {length_penalty_style!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not 1 <= num_return_sequences <= beam_size:
        raise ValueError(f"num_return_sequences must be in [1, beam_size={beam_size}], got {num_return_sequences}")


class _Finished:
    """The K best finished hypotheses of every item: [B, K] tensors sorted by score (desc), ties in
    insertion order; empty slots score -inf."""

    def __init__(self, B: int, K: int, max_length: int, pad: int, device):
        self.K = K
        self.scores = torch.full((B, K), -math.inf, dtype=torch.float64, device=device)
        self.log_probs = torch.full((B, K), -math.inf, dtype=torch.float64, device=device)
        self.lengths = torch.zeros((B, K), dtype=torch.long, device=device)
        self.finished = torch.zeros((B, K), dtype=torch.bool, device=device)
        self.tokens = torch.full((B, K, max_length), pad, dtype=torch.long, device=device)

    def add(self, items: Tensor, scores: Tensor, log_probs: Tensor, length: int, finished: bool,
            tokens: Tensor) -> None:
        """items [A] original item ids; scores / log_probs [A, M] (-inf: no hypothesis); tokens [A, M, L]."""
        A, M = scores.shape
        all_scores = torch.cat([self.scores[items], scores], 1)
        # stable: on equal scores the kept ones (earlier) stay ahead of the new ones, new ones in rank order
        top = torch.sort(all_scores, dim=1, descending=True, stable=True).indices[:, :self.K]

        def merge(old: Tensor, new: Tensor) -> Tensor:
            both = torch.cat([old[items], new], 1)
            index = top.view(A, self.K, *([1] * (both.dim() - 2))).expand(A, self.K, *both.shape[2:])
            return both.gather(1, index)

        self.scores[items] = all_scores.gather(1, top)
        self.log_probs[items] = merge(self.log_probs, log_probs)
        self.lengths[items] = merge(self.lengths, torch.full((A, M), length, dtype=torch.long, device=items.device))
        self.finished[items] = merge(self.finished, torch.full((A, M), finished, device=items.device))
        self.tokens[items] = merge(self.tokens, tokens)


def beam_search(step: StepFn, start_tokens: Union[Tensor, Sequence[int]], state: Any = None, *, beam_size: int,
                max_length: int, eos_token_id: int, min_length: int = 0, length_penalty_alpha: float = 1.0,
                length_penalty_style: str = "power", early_stopping: Union[bool, str] = False,
                num_return_sequences: Optional[int] = None, pad_token_id: Optional[int] = None,
                reorder_state: Optional[Callable[[Any, Tensor], Any]] = None) -> BeamSearchOutput:
    """Batched beam search (rules: module doc).

    step(tokens [B_live*K], state) -> (logits [B_live*K, V], state); start_tokens [B]; state: the initial
    state of the B items (dim 0 = B), expanded to B*K rows with reorder_state(state, [0,0,..,1,1,..]).
    Returns the num_return_sequences (default beam_size) best hypotheses of each item.
    """
    reorder = reorder_state or _default_reorder
    K = beam_size
    n_return = K if num_return_sequences is None else num_return_sequences
    _check_beam_args(beam_size, max_length, eos_token_id, min_length, length_penalty_style, early_stopping,
                     n_return)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    start = _start_tokens(start_tokens)
    B, device = start.numel(), start.device

    def lp(n: int) -> float:
        return length_penalty(n, length_penalty_alpha, length_penalty_style)

    expand = torch.arange(B, device=device).repeat_interleave(K)
    state = reorder(state, expand)
    tokens = start[expand]
    active = torch.arange(B, device=device)          # original ids of the items still searching
    beam_rank = torch.arange(K, device=device)
    live_scores: Optional[Tensor] = None              # [A, K]; beams 1..K-1 start dead (-inf)
    history = torch.full((B * K, max_length), pad, dtype=torch.long, device=device)
    done_set = _Finished(B, K, max_length, pad, device)

    for t in range(max_length):
        A = active.numel()
        logits, state = _call_step(step, tokens, state, A * K)
        if live_scores is None:
            live_scores = torch.full((A, K), -math.inf, dtype=score_dtype(logits.dtype), device=device)
            live_scores[:, 0] = 0.0
        if logits.shape[1] < 2:
            raise ValueError("beam_search needs a vocabulary of at least 2 tokens")
        beam_in = live_scores
        if t + 1 < min_length:
            logits, no_eos = _mask_eos(logits, eos_token_id)
            beam_in = live_scores + no_eos.to(device).view(A, K)
        scores, cand_tokens, parents = ops.beam_topk(logits, beam_in.to(logits.device), 2 * K, K)  # [A, 2K]
        scores, cand_tokens, parents = scores.to(device), cand_tokens.to(device), parents.to(device)
        row_base = (torch.arange(A, device=device) * K)[:, None]

        # EOS among the K best candidates (finite score): finished hypotheses of length t + 1
        is_eos = cand_tokens == eos_token_id
        new_done = is_eos[:, :K] & torch.isfinite(scores[:, :K])
        if bool(new_done.any()):
            seqs = history[(row_base + parents[:, :K]).reshape(-1)].view(A, K, max_length)
            seqs[:, :, t] = eos_token_id
            log_probs = torch.where(new_done, scores[:, :K].double(), -math.inf)
            done_set.add(active, log_probs / lp(t + 1), log_probs, t + 1, True, seqs)

        # the first K non-EOS candidates (at most K of the 2K are EOS: one per beam) continue
        keep_rank = torch.sort(is_eos.to(torch.int8), dim=1, stable=True).indices[:, :K]
        live_scores = scores.gather(1, keep_rank)
        next_tokens = cand_tokens.gather(1, keep_rank)
        src_rows = (row_base + parents.gather(1, keep_rank)).reshape(-1)
        history = history[src_rows]
        history[:, t] = next_tokens.reshape(-1)

        # per-item stopping rule
        best_live = live_scores[:, 0].double()  # candidates come best first
        n_done = torch.isfinite(done_set.scores[active]).sum(1)
        worst_kept = done_set.scores[active][:, K - 1]
        if early_stopping is True:
            done = n_done >= K
        elif early_stopping == "never":
            if t + 1 == max_length:
                done = torch.zeros_like(n_done, dtype=torch.bool)
            else:
                # best continuation: sum <= best_live <= 0, so the largest divisor over reachable lengths
                bound = best_live / lp(max_length if length_penalty_alpha >= 0 else t + 2)
                done = (n_done >= K) & (worst_kept >= bound)
        else:
            done = (n_done >= K) & (worst_kept >= best_live / lp(t + 1))
        done = done | (best_live == -math.inf)

        if t + 1 == max_length:
            open_items = (~done).nonzero().squeeze(1)
            if open_items.numel():
                log_probs = live_scores[open_items].double()
                log_probs = torch.where(torch.isfinite(log_probs), log_probs, -math.inf)
                seqs = history.view(A, K, max_length)[open_items]
                done_set.add(active[open_items], log_probs / lp(max_length), log_probs, max_length, False, seqs)
            break
        if bool(done.all()):
            break
        if bool(done.any()):  # drop finished items from the batch
            stay = (~done).nonzero().squeeze(1)
            stay_rows = (stay[:, None] * K + beam_rank).reshape(-1)
            active, live_scores, next_tokens = active[stay], live_scores[stay], next_tokens[stay]
            history, src_rows = history[stay_rows], src_rows[stay_rows]
        state = reorder(state, src_rows)
        tokens = next_tokens.reshape(-1)

    n = n_return
    empty = ~torch.isfinite(done_set.scores[:, :n])
    lengths = done_set.lengths[:, :n].masked_fill(empty, 0)
    L = max(1, int(lengths.max()))
    sequences = done_set.tokens[:, :n, :L].masked_fill(empty[:, :, None], pad)
    return BeamSearchOutput(sequences=sequences, lengths=lengths, scores=done_set.scores[:, :n].clone(),
                            log_probs=done_set.log_probs[:, :n].masked_fill(empty, -math.inf),
                            finished=done_set.finished[:, :n] & ~empty)


# ---------------------------------------------------------------------------------------------------
# Greedy search
# ---------------------------------------------------------------------------------------------------
@dataclass
class GreedySearchOutput:
    sequences: Tensor  # [B, L] int64: generated tokens (EOS included), then pad_token_id
    lengths: Tensor    # [B] int64
    log_probs: Tensor  # [B] sum of the chosen tokens' log-probs (fp32; fp64 for fp64 logits)
    finished: Tensor   # [B] bool: ended with EOS


def greedy_search(step: StepFn, start_tokens: Union[Tensor, Sequence[int]], state: Any = None, *,
                  max_length: int, eos_token_id: int, min_length: int = 0, pad_token_id: Optional[int] = None,
                  reorder_state: Optional[Callable[[Any, Tensor], Any]] = None) -> GreedySearchOutput:
    """Argmax decoding (ties: the lowest token id) with the log-probs of beam_topk(k=1); items that emit
    EOS leave the batch. Same as beam_search(beam_size=1, early_stopping=True) whenever EOS is not the
    argmax-but-masked case."""
    reorder = reorder_state or _default_reorder
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an int >= 1, got {max_length}")
    if not isinstance(min_length, int) or not 0 <= min_length <= max_length:
        raise ValueError(f"min_length must be an int in [0, max_length={max_length}], got {min_length}")
    pad = eos_token_id if pad_token_id is None else pad_token_id
    tokens = _start_tokens(start_tokens)
    B, device = tokens.numel(), tokens.device
    sequences = torch.full((B, max_length), pad, dtype=torch.long, device=device)
    lengths = torch.full((B,), max_length, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    log_probs: Optional[Tensor] = None
    active = torch.arange(B, device=device)
    for t in range(max_length):
        logits, state = _call_step(step, tokens, state, active.numel())
        if log_probs is None:
            log_probs = torch.zeros(B, dtype=score_dtype(logits.dtype), device=device)
        beam_in = torch.zeros(active.numel(), 1, dtype=log_probs.dtype, device=logits.device)
        if t + 1 < min_length:
            logits, no_eos = _mask_eos(logits, eos_token_id)
            beam_in = no_eos[:, None]
        score, token, _ = ops.beam_topk(logits, beam_in, 1, 1)
        token, score = token[:, 0].to(device), score[:, 0].to(device)
        sequences[active, t] = token
        log_probs[active] += score
        ended = token == eos_token_id
        if bool(ended.any()):
            lengths[active[ended]] = t + 1
            finished[active[ended]] = True
            stay = (~ended).nonzero().squeeze(1)
            if stay.numel() == 0:
                break
            active, token = active[stay], token[stay]
            state = reorder(state, stay)
        tokens = token
    L = int(lengths.max())
    return GreedySearchOutput(sequences=sequences[:, :L], lengths=lengths, log_probs=log_probs, finished=finished)


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------
def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_tokens_to_keep: int = 1) -> Tensor:
    """Temperature, then top-k (ties at the threshold kept), then top-p (smallest prefix with mass >= p,
    ties ordered by lower index), at least min_tokens_to_keep kept: Hugging Face's warpers, made exact.

    logits [..., V] -> [..., V] fp32 (fp64 for fp64 logits) = logits / temperature with removed tokens at
    -inf. -inf logits are fine (fp16 too: the work is in fp32); NaN / +inf raise ValueError.
    Spec: fusedrnn.reference_decoding.filter_logits_reference (equal to it bit for bit).
    """
    check_filter_args(logits, temperature, top_k, top_p, min_tokens_to_keep)
    V = logits.shape[-1]
    x = logits.reshape(-1, V).to(score_dtype(logits.dtype))
    if bool(torch.isnan(x).any() | torch.isposinf(x).any()):
        raise ValueError("filter_logits: logits contain NaN or +inf")
    x = x / temperature
    if top_k > 0:
        kk = min(max(top_k, min_tokens_to_keep), V)
        threshold = torch.topk(x, kk, dim=-1).values[:, -1:]
        x = x.masked_fill(x < threshold, -math.inf)
    if top_p < 1.0 and x.numel():
        # Only tokens still > -inf can be kept; top-k usually leaves a few, so order just the first
        # `width` of each row instead of sorting all V (a 256k sort is ~10 ms a row on a CPU).
        width = int((x > -math.inf).sum(-1).max()) if top_k > 0 else V
        width = max(width, min(min_tokens_to_keep, V), 1)
        if width < V:
            cand = torch.topk(x, width, dim=-1).indices           # the survivors, in no tie order
            cand = torch.sort(cand, dim=-1).values                 # index asc: the stable sort keeps it on ties
            order_in = torch.sort(x.gather(-1, cand), dim=-1, descending=True, stable=True).indices
            order = cand.gather(-1, order_in)                     # (x desc, index asc)
        else:
            order = torch.sort(x, dim=-1, descending=True, stable=True).indices
        probs = torch.softmax(x, dim=-1).gather(-1, order).double()
        before = torch.cumsum(probs, dim=-1) - probs
        keep_sorted = before < top_p
        keep_sorted[:, :min_tokens_to_keep] = True
        keep = torch.zeros_like(x, dtype=torch.bool).scatter(-1, order, keep_sorted)
        x = x.masked_fill(~keep, -math.inf)
    return x.reshape(logits.shape)


def sample(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None, min_tokens_to_keep: int = 1) -> Tensor:
    """Draws one token per row of logits [..., V] -> [...] int64 from softmax(filter_logits(...)).
    The same generator state gives the same tokens. A row with no finite logit raises ValueError."""
    x = filter_logits(logits, temperature, top_k, top_p, min_tokens_to_keep)
    rows = x.reshape(-1, x.shape[-1])
    if bool((rows == -math.inf).all(-1).any()):
        raise ValueError("sample: a row of logits has no finite value")
    probs = torch.softmax(rows, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])
