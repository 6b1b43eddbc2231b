"""merge_mode on the recurrent modules and fusedrnn.nn.Attention, against plain torch expressions."""
import math

import pytest
import torch

import fusedrnn
from fusedrnn.nn import Attention

DT = torch.float64
MERGES = {
    "sum": lambda f, b: f + b,
    "mul": lambda f, b: f * b,
    "ave": lambda f, b: (f + b) / 2,
    "concat": lambda f, b: torch.cat([f, b], -1),
}
PAIRS = [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "tanh"})]


@pytest.mark.parametrize("mode", list(MERGES))
@pytest.mark.parametrize("name,kw", PAIRS, ids=[p[0] for p in PAIRS])
def test_merge_mode_matches_torch(name, kw, mode):
    T, B, I, H, L = 5, 3, 4, 6, 2
    ours = getattr(fusedrnn, name)(I, H, L, bidirectional=True, batch_first=True, merge_mode=mode, dtype=DT, **kw)
    ref = getattr(torch.nn, name)(I, H, L, bidirectional=True, batch_first=True, dtype=DT, **kw)
    ref.load_state_dict(ours.state_dict())  # merge_mode adds no parameters: loads both ways
    x = torch.randn(B, T, I, dtype=DT, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, h = ours(x)
    y_ref, h_ref = ref(x_ref)
    expected = MERGES[mode](y_ref[..., :H], y_ref[..., H:])
    assert y.shape == (B, T, 2 * H if mode == "concat" else H)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(h, h_ref)  # final states are per direction, never merged
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for (n, p), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=n)


def test_merge_mode_with_lengths_and_unidirectional():
    # padded steps are zero in both directions, so every merge keeps them zero
    lstm = fusedrnn.LSTM(3, 4, bidirectional=True, merge_mode="sum", dtype=DT)
    y, _ = lstm(torch.randn(6, 2, 3, dtype=DT), lengths=[6, 3])
    assert y.shape == (6, 2, 4) and bool((y[3:, 1] == 0).all()) and bool((y[:, 0] != 0).any())
    uni = fusedrnn.GRU(3, 4, merge_mode="mul")  # no second direction: nothing to merge
    assert uni(torch.randn(6, 2, 3))[0].shape == (6, 2, 4)


def test_merge_mode_validation_and_repr():
    with pytest.raises(ValueError, match="'concat', 'sum', 'mul', 'ave'"):
        fusedrnn.LSTM(3, 4, bidirectional=True, merge_mode="max")
    assert "merge_mode" not in repr(fusedrnn.LSTM(3, 4, bidirectional=True))
    assert "merge_mode='ave'" in repr(fusedrnn.RNN(3, 4, bidirectional=True, merge_mode="ave"))


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------
def _scores_ref(att, q, k):
    """q [B, Tq, Hq], k [B, Tk, Hk] -> [B, Tq, Tk], written out with einsum."""
    if att.score == "dot":
        return torch.einsum("bqh,bkh->bqk", q, k)
    if att.score == "general":
        return torch.einsum("bqh,hj,bkj->bqk", q, att.linear.weight, k)
    wq, bq, wk, v = att.query_proj.weight, att.query_proj.bias, att.key_proj.weight, att.v.weight[0]
    hidden = torch.tanh((q @ wq.T + bq)[:, :, None, :] + (k @ wk.T)[:, None, :, :])
    return hidden @ v


def _attention_ref(att, q, k, v, mask):
    s = _scores_ref(att, q, k)
    if mask is not None:
        s = s + torch.where(mask, 0.0, -1e30).to(s.dtype)[:, None, :]  # big finite negative: no NaN
        w = torch.softmax(s, -1) * mask[:, None, :].to(s.dtype) * mask.any(-1)[:, None, None].to(s.dtype)
    else:
        w = torch.softmax(s, -1)
    return w @ v, w


@pytest.mark.parametrize("score", Attention.SCORES)
@pytest.mark.parametrize("query_3d", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_torch(score, query_3d, masked):
    B, Tq, Tk, Hq, Hk, Hv = 4, 3, 7, 5, 5 if score == "dot" else 6, 2
    att = Attention(Hq, Hk, score=score, dtype=DT)
    q = torch.randn(B, Tq, Hq, dtype=DT) if query_3d else torch.randn(B, Hq, dtype=DT)
    k, v = torch.randn(B, Tk, Hk, dtype=DT), torch.randn(B, Tk, Hv, dtype=DT)
    # item 1 fully masked (must give zero weights), the others a prefix of their keys
    mask = (torch.arange(Tk)[None] < torch.tensor([7, 0, 3, 1])[:, None]) if masked else None
    leaves = [q, k, v] + list(att.parameters())
    for t in leaves:
        t.requires_grad_(True)
    ctx, w = att(q, k, v, mask=mask)
    ctx_ref, w_ref = _attention_ref(att, q if query_3d else q[:, None], k, v, mask)
    if not query_3d:
        ctx_ref, w_ref = ctx_ref[:, 0], w_ref[:, 0]
    assert ctx.shape == ((B, Tq, Hv) if query_3d else (B, Hv)) and w.shape == ctx.shape[:-1] + (Tk,)
    torch.testing.assert_close(ctx, ctx_ref)
    torch.testing.assert_close(w, w_ref)
    g = torch.randn_like(ctx)
    grads = torch.autograd.grad((ctx * g).sum() + (w ** 2).sum(), leaves)
    grads_ref = torch.autograd.grad((ctx_ref * g).sum() + (w_ref ** 2).sum(), leaves)
    for a, b in zip(grads, grads_ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    if masked:
        assert bool((w[1] == 0).all()) and bool((ctx[1] == 0).all())
        assert bool((w[2][..., 3:] == 0).all())
        torch.testing.assert_close(w.sum(-1)[[0, 2, 3]], torch.ones_like(w.sum(-1)[[0, 2, 3]]))


def test_attention_values_default_to_keys_and_validation():
    att = Attention(4, score="dot")
    q, k = torch.randn(2, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(att(q, k)[0], att(q, k, k)[0])
    with pytest.raises(ValueError, match="'dot', 'general', 'additive'"):
        Attention(4, score="cosine")
    with pytest.raises(ValueError, match="query_size == key_size"):
        Attention(4, 5, score="dot")
    with pytest.raises(ValueError, match="mask"):
        att(q, k, mask=torch.ones(2, 4, dtype=torch.bool))
    assert math.isclose(float(att(q, k)[1].sum()), 2.0, rel_tol=1e-6)
