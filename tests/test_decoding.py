"""Decoding: beam search (vs exhaustive search and the one-item spec), greedy search, sampling and logit
filtering (vs fusedrnn.reference_decoding)."""
from __future__ import annotations

import itertools
import math
from collections import namedtuple

import pytest
import torch

import fusedrnn
from fusedrnn.decoding import beam_search, filter_logits, greedy_search, sample
from fusedrnn.reference_decoding import beam_search_reference, filter_logits_reference, length_penalty

from helpers import interpreting_triton

EOS = 0


# --- toy language models ------------------------------------------------------------------------------
class HashLM:
    """logits = table[hash(start token, prefix)]: a fixed random distribution per prefix (fp64), state =
    the running hash [N] int64, so it reorders like any tensor state and decodes bit-identically in any
    batch."""

    def __init__(self, V, seed=0, M=10007, scale=2.0, eos_bias=0.0):
        g = torch.Generator().manual_seed(seed)
        self.V, self.M = V, M
        self.table = torch.randn(M, V, generator=g, dtype=torch.float64) * scale
        self.table[:, EOS] += eos_bias

    def _h(self, h, tok):
        return (h * 31 + tok + 7) % self.M

    def step(self, tokens, state):
        state = self._h(state, tokens)
        return self.table[state], state

    def init(self, start_tokens):
        return torch.zeros(len(start_tokens), dtype=torch.long)

    def logits_fn(self, start):
        def fn(prefix):
            h = self._h(torch.tensor(0), torch.tensor(start))
            for tok in prefix:
                h = self._h(h, torch.tensor(tok))
            return self.table[h]
        return fn


class GRULM:
    """Embedding -> GRUCell -> Linear; prompts are encoded by a torch.nn.GRU sharing the cell's weights."""

    def __init__(self, V=12, E=8, H=16, seed=0, dtype=torch.float64, eos_bias=1.0):
        g = torch.Generator().manual_seed(seed)
        self.V = V
        self.emb = torch.randn(V, E, generator=g, dtype=dtype)
        self.gru = torch.nn.GRU(E, H, dtype=dtype)
        self.cell = torch.nn.GRUCell(E, H, dtype=dtype)
        with torch.no_grad():
            for name, p in self.gru.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
                getattr(self.cell, name[:-3]).copy_(p)
        self.out_w = torch.randn(V, H, generator=g, dtype=dtype)
        self.out_b = torch.randn(V, generator=g, dtype=dtype) * 0.5
        self.out_b[EOS] += eos_bias

    @torch.no_grad()
    def step(self, tokens, h):
        h = self.cell(self.emb[tokens], h)
        return h @ self.out_w.t() + self.out_b, h

    @torch.no_grad()
    def encode(self, prompts):
        """Padded batch of prompts (lists of token ids, different lengths) -> h [B, H]."""
        lengths = torch.tensor([len(p) for p in prompts])
        padded = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
        for i, p in enumerate(prompts):
            padded[i, :len(p)] = torch.tensor(p)
            padded[i, len(p):] = 3  # padding: must not matter
        packed = torch.nn.utils.rnn.pack_padded_sequence(self.emb[padded], lengths, batch_first=True,
                                                         enforce_sorted=False)
        return self.gru(packed)[1][0]


def hyps(out, i):
    """Item i of a BeamSearchOutput as [(tokens, score, finished)]."""
    return [(tuple(out.sequences[i, j, :out.lengths[i, j]].tolist()), out.scores[i, j].item(),
             bool(out.finished[i, j])) for j in range(out.scores.shape[1]) if out.lengths[i, j] > 0]


def assert_same_hyps(got, expect, tol=1e-9):
    assert [h[0] for h in got] == [h[0] for h in expect], f"\n{got}\n!=\n{expect}"
    assert [h[2] for h in got] == [h[2] for h in expect]
    for a, b in zip(got, expect):
        assert abs(a[1] - b[1]) <= tol * max(1.0, abs(b[1])), (a, b)


# --- beam search vs exhaustive search -----------------------------------------------------------------
def exhaustive(logits_fn, V, T, alpha, style, min_length=0):
    """Every hypothesis beam search can return: EOS-terminated sequences of length min_length..T (EOS
    only at the end) and unfinished sequences of length T, scored in fp64. Best first."""
    def score(seq):
        logp = sum(torch.log_softmax(logits_fn(seq[:i]), 0)[seq[i]].item() for i in range(len(seq)))
        return logp / length_penalty(len(seq), alpha, style)

    words = [t for t in range(V) if t != EOS]
    out = []
    for L in range(max(min_length, 1), T + 1):
        for body in itertools.product(words, repeat=L - 1):
            out.append(((*body, EOS), score((*body, EOS)), True))
    for body in itertools.product(words, repeat=T):
        out.append((body, score(body), False))
    return sorted(out, key=lambda h: -h[1])


EXHAUSTIVE = [  # V, T, alpha, style, min_length, early_stopping
    (4, 3, 1.0, "power", 0, "never"), (4, 3, 0.0, "power", 0, "never"), (4, 3, 0.0, "power", 0, False),
    (4, 3, 0.6, "gnmt", 0, "never"), (4, 3, -0.5, "power", 0, "never"), (3, 4, 1.0, "power", 2, "never"),
    (3, 4, 2.0, "gnmt", 0, "never"),
]


@pytest.mark.parametrize("V,T,alpha,style,min_length,early", EXHAUSTIVE,
                         ids=["V{}-T{}-{}{}-min{}-es_{}".format(*c[:1], c[1], c[3], c[2], c[4], c[5]) for c in EXHAUSTIVE])
def test_beam_equals_exhaustive(V, T, alpha, style, min_length, early):
    """beam_size = V**(T-1) keeps every prefix, so the n-best must be the exhaustive n-best."""
    K = V ** (T - 1)
    lm = HashLM(V, seed=V * 10 + T, eos_bias=0.5)
    starts = [1, 2]
    out = beam_search(lm.step, torch.tensor(starts), lm.init(starts), beam_size=K, max_length=T,
                      eos_token_id=EOS, min_length=min_length, length_penalty_alpha=alpha,
                      length_penalty_style=style, early_stopping=early)
    for i, start in enumerate(starts):
        expect = exhaustive(lm.logits_fn(start), V, T, alpha, style, min_length)[:K]
        assert_same_hyps(hyps(out, i), expect)


# --- beam search vs the one-item spec ------------------------------------------------------------------
SPEC_CASES = [  # K, alpha, style, early_stopping, min_length
    (1, 1.0, "power", False, 0), (3, 1.0, "power", False, 0), (3, 0.0, "power", True, 0),
    (4, 0.6, "gnmt", "never", 2), (2, 2.0, "power", False, 3), (5, -0.5, "power", "never", 0),
    (3, 1.0, "gnmt", True, 1),
]


@pytest.mark.parametrize("K,alpha,style,early,min_length", SPEC_CASES,
                         ids=["K{}-{}{}-es_{}-min{}".format(c[0], c[2], c[1], c[3], c[4]) for c in SPEC_CASES])
def test_beam_matches_spec(K, alpha, style, early, min_length):
    lm = HashLM(9, seed=K, eos_bias=0.3)
    starts = [1, 2, 3, 4, 5]
    out = beam_search(lm.step, torch.tensor(starts), lm.init(starts), beam_size=K, max_length=7,
                      eos_token_id=EOS, min_length=min_length, length_penalty_alpha=alpha,
                      length_penalty_style=style, early_stopping=early)
    for i, start in enumerate(starts):
        ref = beam_search_reference(lm.logits_fn(start), K, 7, EOS, min_length=min_length,
                                    length_penalty_alpha=alpha, length_penalty_style=style,
                                    early_stopping=early)
        assert_same_hyps(hyps(out, i), [(h.tokens, h.score, h.finished) for h in ref])
        n = len(ref)
        # scores are log_prob / length_penalty(length); n-best sorted
        lp = torch.tensor([length_penalty(int(L), alpha, style) for L in out.lengths[i, :n]], dtype=torch.float64)
        assert torch.equal(out.scores[i, :n], out.log_probs[i, :n] / lp)
        assert (out.scores[i, :n].diff() <= 0).all()
        assert all(L >= min_length for L in out.lengths[i, :n].tolist())


def test_length_penalty_changes_the_winner():
    """Premise of the variants above: on this model alpha decides between a short and a long best."""
    lm = HashLM(6, seed=3, eos_bias=0.0)
    best = {}
    for alpha, style in [(0.0, "power"), (2.0, "power"), (2.0, "gnmt")]:
        out = beam_search(lm.step, torch.tensor([1, 2, 3, 4]), lm.init([1, 2, 3, 4]), beam_size=4, max_length=8,
                          eos_token_id=EOS, length_penalty_alpha=alpha, length_penalty_style=style,
                          early_stopping="never")
        best[(alpha, style)] = out.lengths[:, 0].tolist()
    assert best[(0.0, "power")] != best[(2.0, "power")]
    assert sum(best[(2.0, "power")]) > sum(best[(0.0, "power")])  # alpha > 0 favours longer hypotheses


def test_n_best_prefix():
    lm = HashLM(7, seed=4, eos_bias=0.5)
    kw = dict(beam_size=4, max_length=6, eos_token_id=EOS, early_stopping="never")
    full = beam_search(lm.step, torch.tensor([1, 2]), lm.init([1, 2]), **kw)
    two = beam_search(lm.step, torch.tensor([1, 2]), lm.init([1, 2]), num_return_sequences=2, **kw)
    assert two.scores.shape == (2, 2)
    for i in range(2):
        assert hyps(two, i) == hyps(full, i)[:2]
        assert len(hyps(full, i)) == 4


# --- EOS handling --------------------------------------------------------------------------------------
class TableLM:
    """Step 0: logits first_logits; afterwards: uniform over V (every continuation costs log V)."""

    def __init__(self, first_logits):
        self.first = torch.tensor(first_logits, dtype=torch.float64)
        self.V = len(first_logits)

    def step(self, tokens, t):
        logits = self.first.expand(len(tokens), -1) if int(t[0]) == 0 else torch.zeros(len(tokens), self.V,
                                                                                       dtype=torch.float64)
        return logits, t + 1


def test_eos_ranked_at_or_below_beam_is_not_finalised():
    # candidates at step 0: token 1 (rank 0), token 2 (rank 1), EOS (rank 2)
    lm = TableLM([2.0, 3.0, 2.5, -10.0, -10.0])
    p_eos = torch.log_softmax(lm.first, 0)[EOS].item()
    # (EOS,) scores log p(EOS) ~ -1.68, better than any two-token hypothesis (<= -0.68 - log 5 ~ -2.3)
    assert p_eos > torch.log_softmax(lm.first, 0)[1].item() - math.log(5)
    kw = dict(max_length=3, eos_token_id=EOS, length_penalty_alpha=0.0, early_stopping="never")
    out2 = beam_search(lm.step, torch.tensor([1]), torch.zeros(1, dtype=torch.long), beam_size=2, **kw)
    assert (EOS,) not in [h[0] for h in hyps(out2, 0)]
    ref = beam_search_reference(lambda p: lm.step(torch.tensor([0]), torch.tensor([len(p)]))[0][0], 2, 3, EOS,
                                length_penalty_alpha=0.0, early_stopping="never")
    assert_same_hyps(hyps(out2, 0), [(h.tokens, h.score, h.finished) for h in ref])
    # with beam 3 the same EOS ranks < K and wins
    out3 = beam_search(lm.step, torch.tensor([1]), torch.zeros(1, dtype=torch.long), beam_size=3, **kw)
    assert hyps(out3, 0)[0][0] == (EOS,) and abs(hyps(out3, 0)[0][1] - p_eos) < 1e-12


def test_min_length_masks_eos():
    lm = TableLM([5.0, 0.0, 0.0])  # EOS is by far the best first token
    out = beam_search(lm.step, torch.tensor([1]), torch.zeros(1, dtype=torch.long), beam_size=2, max_length=4,
                      eos_token_id=EOS, min_length=3, length_penalty_alpha=0.0)
    assert (out.lengths[0] >= 3).all()
    # best: a word, a word, EOS -- scored with the model's probabilities, not renormalised without EOS
    expect = torch.log_softmax(lm.first, 0)[1].item() + 2 * math.log(1 / 3)
    assert out.lengths[0, 0] == 3 and out.finished[0, 0] and abs(out.log_probs[0, 0].item() - expect) < 1e-12
    g = greedy_search(lm.step, torch.tensor([1]), torch.zeros(1, dtype=torch.long), max_length=4,
                      eos_token_id=EOS, min_length=3)
    assert g.lengths.tolist() == [3] and g.sequences[0, -1] == EOS
    assert abs(g.log_probs[0].item() - expect) < 1e-12


# --- batch independence ---------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,early", [(0.0, False), (1.0, True)], ids=["power0-es_False", "power1-es_True"])
def test_batch_of_mixed_lengths_equals_items_alone(alpha, early):
    lm = GRULM(V=12, seed=1, eos_bias=3.0)
    prompts = [[4, 5, 6, 7, 8], [2], [9, 9, 3], [1, 2, 3, 4, 5, 6, 7], [11, 10]]
    starts = [1, 2, 1, 5, 7]
    rows_per_step = []

    def step(tokens, h):
        rows_per_step.append(len(tokens))
        return lm.step(tokens, h)

    kw = dict(beam_size=3, max_length=12, eos_token_id=EOS, length_penalty_alpha=alpha, early_stopping=early)
    out = beam_search(step, torch.tensor(starts), lm.encode(prompts), **kw)
    # premise: items left the batch at different steps, and hypotheses have different lengths
    assert len(set(rows_per_step)) > 2, rows_per_step
    assert len(set(out.lengths[:, 0].tolist())) > 1
    for i, (prompt, start) in enumerate(zip(prompts, starts)):
        alone = beam_search(lm.step, torch.tensor([start]), lm.encode([prompt]), **kw)
        assert_same_hyps(hyps(out, i), hyps(alone, 0), tol=1e-12)
    # greedy too
    g = greedy_search(lm.step, torch.tensor(starts), lm.encode(prompts), max_length=12, eos_token_id=EOS)
    assert len(set(g.lengths.tolist())) > 1
    for i, (prompt, start) in enumerate(zip(prompts, starts)):
        alone = greedy_search(lm.step, torch.tensor([start]), lm.encode([prompt]), max_length=12, eos_token_id=EOS)
        L = int(alone.lengths[0])
        assert int(g.lengths[i]) == L and torch.equal(g.sequences[i, :L], alone.sequences[0, :L])
        assert abs(g.log_probs[i].item() - alone.log_probs[0].item()) < 1e-12


State = namedtuple("State", "h extra")


def test_nested_state_and_custom_reorder():
    lm = GRULM(V=10, seed=2)
    starts = torch.tensor([1, 2, 3])
    h0 = lm.encode([[1], [2, 3], [4, 5, 6]])
    kw = dict(beam_size=3, max_length=8, eos_token_id=EOS)
    plain = beam_search(lm.step, starts, h0, **kw)

    def nested_step(tokens, state):
        # every leaf must have been reordered with the same index as h
        assert torch.equal(state["pair"][0], state["pair"][1].h) and torch.equal(state["ids"][0], state["pair"][0][:, 0])
        logits, h = lm.step(tokens, state["pair"][0])
        return logits, {"pair": (h, State(h.clone(), None)), "ids": [h[:, 0].clone()], "n": state["n"] + 1}

    nested = beam_search(nested_step, starts, {"pair": (h0, State(h0.clone(), None)), "ids": [h0[:, 0].clone()],
                                                "n": 0}, **kw)
    for i in range(3):
        assert hyps(nested, i) == hyps(plain, i)

    # an LSTM-style [layers, N, H] state with a user reorder function
    def layered_step(tokens, state):
        logits, h = lm.step(tokens, state[0])
        return logits, h[None]

    layered = beam_search(layered_step, starts, h0[None], reorder_state=lambda s, idx: s.index_select(1, idx), **kw)
    for i in range(3):
        assert hyps(layered, i) == hyps(plain, i)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_beam_search_backends_agree(backend):
    if backend == "cpu" and not hasattr(torch.ops.fusedrnn, "cpu_beam_topk"):
        pytest.skip("C++ extension not built")
    if backend == "triton" and not interpreting_triton():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    lm = GRULM(V=12, seed=3, dtype=torch.float32)
    starts = torch.tensor([1, 2])
    h0 = lm.encode([[3, 4], [5]])
    kw = dict(beam_size=2, max_length=5, eos_token_id=EOS)
    with fusedrnn.use_backend("reference"):
        expect = beam_search(lm.step, starts, h0, **kw)
    with fusedrnn.use_backend(backend):
        got = beam_search(lm.step, starts, h0, **kw)
    for i in range(2):
        assert_same_hyps(hyps(got, i), hyps(expect, i), tol=1e-5)


# --- greedy ---------------------------------------------------------------------------------------------
def test_greedy_is_argmax_and_beam_one():
    lm = HashLM(8, seed=5, eos_bias=0.5)
    starts = [1, 2, 3, 4]
    g = greedy_search(lm.step, torch.tensor(starts), lm.init(starts), max_length=9, eos_token_id=EOS)
    b1 = beam_search(lm.step, torch.tensor(starts), lm.init(starts), beam_size=1, max_length=9, eos_token_id=EOS,
                     early_stopping=True, length_penalty_alpha=0.0)
    for i, start in enumerate(starts):
        fn, seq, logp = lm.logits_fn(start), [], 0.0
        for _ in range(9):
            logits = fn(tuple(seq))
            tok = int(torch.argmax(logits))
            logp += torch.log_softmax(logits, 0)[tok].item()
            seq.append(tok)
            if tok == EOS:
                break
        L = int(g.lengths[i])
        assert g.sequences[i, :L].tolist() == seq and abs(g.log_probs[i].item() - logp) < 1e-12
        assert g.finished[i].item() == (seq[-1] == EOS)
        assert hyps(b1, i)[0][0] == tuple(seq) and abs(b1.log_probs[i, 0].item() - logp) < 1e-12


def test_greedy_ties_pick_lowest_token():
    def step(tokens, state):
        logits = torch.zeros(len(tokens), 5)
        logits[:, 2] = logits[:, 4] = 1.0
        return logits, state

    g = greedy_search(step, torch.tensor([1, 1]), None, max_length=3, eos_token_id=EOS)
    assert g.sequences.tolist() == [[2, 2, 2], [2, 2, 2]] and not g.finished.any()


def test_bad_arguments():
    lm = HashLM(5)
    s = torch.tensor([1])
    with pytest.raises(ValueError, match="num_return_sequences"):
        beam_search(lm.step, s, lm.init([1]), beam_size=2, max_length=3, eos_token_id=EOS, num_return_sequences=3)
    with pytest.raises(ValueError, match="early_stopping"):
        beam_search(lm.step, s, lm.init([1]), beam_size=2, max_length=3, eos_token_id=EOS, early_stopping="yes")
    with pytest.raises(ValueError, match="min_length"):
        beam_search(lm.step, s, lm.init([1]), beam_size=2, max_length=3, eos_token_id=EOS, min_length=4)
    with pytest.raises(ValueError, match="length_penalty_style"):
        beam_search(lm.step, s, lm.init([1]), beam_size=2, max_length=3, eos_token_id=EOS,
                    length_penalty_style="linear")
    with pytest.raises(ValueError, match="logits of shape"):
        beam_search(lambda t, st: (torch.zeros(1, 5), st), s, None, beam_size=2, max_length=3, eos_token_id=EOS)


# --- filtering ------------------------------------------------------------------------------------------
def test_filter_top_k_keeps_ties_at_threshold():
    x = torch.tensor([[3.0, 2.0, 2.0, 1.0, 2.0, -math.inf]])
    out = filter_logits(x, top_k=2)
    assert torch.equal(out, torch.tensor([[3.0, 2.0, 2.0, -math.inf, 2.0, -math.inf]]))
    assert torch.equal(filter_logits_reference(x, top_k=2), out)


def test_filter_top_p_smallest_set_and_tie_order():
    x = torch.zeros(1, 4)  # 0.25 each (exact in binary)
    assert (filter_logits(x, top_p=0.5) > -math.inf).tolist() == [[True, True, False, False]]
    assert (filter_logits(x, top_p=0.51) > -math.inf).tolist() == [[True, True, True, False]]
    assert (filter_logits(x, top_p=0.0) > -math.inf).tolist() == [[True, False, False, False]]
    assert (filter_logits(x, top_p=0.1, min_tokens_to_keep=3) > -math.inf).tolist() == [[True, True, True, False]]
    y = torch.tensor([[0.0, 2.0, 0.0, 1.0]])  # ordered 1, 3, then the tied 0 before 2
    p = torch.softmax(y, -1)[0]
    cut = (p[1] + p[3] + p[0] / 2).item()
    assert (filter_logits(y, top_p=cut) > -math.inf).tolist() == [[True, True, False, True]]


def test_filter_min_tokens_to_keep_in_top_k():
    x = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    assert (filter_logits(x, top_k=1, min_tokens_to_keep=3) > -math.inf).sum() == 3


FILTERS = [  # temperature, top_k, top_p, min_tokens_to_keep
    (1.0, 0, 1.0, 1), (0.7, 5, 1.0, 1), (1.3, 0, 0.9, 1), (0.5, 10, 0.8, 1), (1.0, 3, 0.5, 4), (2.0, 0, 0.3, 2),
    (1.0, 50, 0.95, 1), (1.0, 1, 1.0, 1), (0.9, 0, 0.0, 1), (1.0, 2000, 0.7, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["fp32", "fp16", "bf16", "fp64"])
@pytest.mark.parametrize("cfg", FILTERS, ids=["T{}-k{}-p{}-min{}".format(*c) for c in FILTERS])
def test_filter_equals_reference(cfg, dtype):
    T, top_k, top_p, keep = cfg
    g = torch.Generator().manual_seed(top_k + int(top_p * 100))
    x = (torch.randint(-12, 12, (6, 300), generator=g) / 4).to(dtype)  # many ties, at thresholds too
    x[torch.rand(6, 300, generator=g) < 0.3] = -math.inf
    x[5, 3:] = -math.inf  # only 3 finite tokens
    got = filter_logits(x, T, top_k, top_p, keep)
    ref = filter_logits_reference(x, T, top_k, top_p, keep)
    assert got.dtype == ref.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(got, ref)
    assert not torch.isnan(got).any()
    kept = (got > -math.inf).sum(-1)
    assert (kept >= torch.clamp((x > -math.inf).sum(-1), max=keep)).all()


def test_filter_rejects_nan_and_bad_args():
    with pytest.raises(ValueError, match="NaN"):
        filter_logits(torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(torch.zeros(3), temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(torch.zeros(3), top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(torch.zeros(3), top_k=-1)


# --- sampling -------------------------------------------------------------------------------------------
def test_sample_frequencies_match_filtered_distribution():
    scipy_stats = pytest.importorskip("scipy.stats")
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -math.inf]])
    cfg = dict(temperature=0.8, top_k=7, top_p=0.9)
    N = 40000
    g = torch.Generator().manual_seed(1234)
    draws = sample(logits.expand(N, -1), generator=g, **cfg)
    counts = torch.bincount(draws, minlength=10).double()
    probs = torch.softmax(filter_logits(logits, **cfg)[0].double(), 0)
    kept = probs > 0
    assert kept.sum() == 4 and counts[~kept].sum() == 0  # top-k keeps 7, top-p 4 of them; never drawn
    p_value = scipy_stats.chisquare(counts[kept].numpy(), (probs[kept] * N).numpy()).pvalue
    assert p_value > 1e-3, p_value
    # the test has power: the same draws are far from the unfiltered distribution
    unfiltered = torch.softmax(logits[0, :9].double() / 0.8, 0)
    assert scipy_stats.chisquare(counts[:9].numpy(), (unfiltered * N).numpy()).pvalue < 1e-6


def test_sample_seeded_and_fp16_neg_inf():
    logits = torch.randn(64, 1000, dtype=torch.float16)
    logits[:, ::3] = -math.inf
    a = sample(logits, temperature=0.3, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = sample(logits, temperature=0.3, top_p=0.9, generator=torch.Generator().manual_seed(7))
    c = sample(logits, temperature=0.3, top_p=0.9, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (64,) and (a % 3 != 0).all()  # -inf tokens never drawn
    # logits / 1e-5 overflow fp16 (max 65504); the work is in fp32
    assert torch.isfinite(filter_logits(logits, temperature=1e-5)[:, 1::3]).all()
    with pytest.raises(ValueError, match="no finite"):
        sample(torch.full((2, 5), -math.inf))


# --- GPU (unverified here: no GPU on the development machine) -----------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
def test_beam_search_gpu_equals_cpu(backend):
    lm = GRULM(V=50, seed=4, dtype=torch.float32, eos_bias=2.0)
    prompts = [[4, 5, 6], [2], [9, 9, 3, 1]]
    starts = torch.tensor([1, 2, 3])
    kw = dict(beam_size=4, max_length=10, eos_token_id=EOS, early_stopping=False)
    cpu = beam_search(lm.step, starts, lm.encode(prompts), **kw)
    dev = GRULM(V=50, seed=4, dtype=torch.float32, eos_bias=2.0)
    dev.emb, dev.out_w, dev.out_b = dev.emb.cuda(), dev.out_w.cuda(), dev.out_b.cuda()
    dev.cell, dev.gru = dev.cell.cuda(), dev.gru.cuda()
    h0 = lm.encode(prompts).cuda()
    with fusedrnn.use_backend(backend):
        gpu = beam_search(dev.step, starts.cuda(), h0, **kw)
    for i in range(3):
        assert_same_hyps(hyps(gpu, i), hyps(cpu, i), tol=1e-4)


@pytest.mark.gpu
def test_sample_gpu_seeded():
    logits = torch.randn(8, 32000, device="cuda", dtype=torch.float16)
    logits[:, ::2] = -math.inf
    g1 = torch.Generator(device="cuda").manual_seed(3)
    g2 = torch.Generator(device="cuda").manual_seed(3)
    a = sample(logits, top_k=50, top_p=0.9, generator=g1)
    b = sample(logits, top_k=50, top_p=0.9, generator=g2)
    assert torch.equal(a, b) and (a % 2 == 1).all()
    assert torch.equal(filter_logits(logits, top_k=50, top_p=0.9), filter_logits_reference(logits, top_k=50, top_p=0.9))
