"""fusedrnn with the rest of PyTorch (issue #15): torch.func transforms and forward-mode AD, vmap, TorchScript
tracing (and the clear refusals of torch.jit.script and torch.fx), and the torch.nn attribute surface.

Every transform is compared in float64 with torch.nn running the same weights (torch.nn's CPU RNNs support
them all), so each test fails on a wrong or zero tangent/gradient, not only on an exception.
"""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fusedrnn
from helpers import flatten

MODULES = [  # (name, args, kwargs, input shape)
    ("LSTM", (3, 4), dict(num_layers=2, bidirectional=True), (5, 2, 3)),
    ("LSTM", (3, 4), dict(proj_size=2, batch_first=True), (2, 5, 3)),
    ("GRU", (3, 4), dict(bidirectional=True), (5, 2, 3)),
    ("RNN", (3, 4), dict(nonlinearity="relu", num_layers=2), (5, 2, 3)),
    ("RNN", (3, 4), {}, (5, 3)),  # unbatched
    ("LSTMCell", (3, 4), {}, (2, 3)),
    ("GRUCell", (3, 4), {}, (2, 3)),
    ("RNNCell", (3, 4), dict(nonlinearity="tanh"), (3,)),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'plain'}-{len(s)}d" for n, _, kw, s in MODULES]


def pair(name, args, kw, seed=0):
    """(fusedrnn module, torch.nn module) in float64 with the same weights."""
    torch.manual_seed(seed)
    ours = getattr(fusedrnn, name)(*args, **kw, dtype=torch.float64)
    ref = getattr(nn, name)(*args, **kw, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def first_output(m):
    return lambda x: flatten(m(x))[0]


def assert_same(got, want):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert want.abs().max() > 1e-6, "the comparison is vacuous: the reference result is zero"


# ---------------------------------------------------------------------------------------------------------
# torch.func transforms and forward-mode AD
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,args,kw,shape", MODULES, ids=IDS)
def test_jvp_tangent_is_torchs(name, args, kw, shape):
    ours, ref = pair(name, args, kw)
    x, v = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    got = torch.func.jvp(first_output(ours), (x,), (v,))
    want = torch.func.jvp(first_output(ref), (x,), (v,))
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])


@pytest.mark.parametrize("name,args,kw,shape", MODULES[:3] + MODULES[5:6], ids=IDS[:3] + IDS[5:6])
def test_forward_ad_dual_tensors(name, args, kw, shape):
    import torch.autograd.forward_ad as fwAD
    ours, ref = pair(name, args, kw)
    x, v = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    tangents = []
    for m in (ours, ref):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(flatten(m(fwAD.make_dual(x, v)))[0]).tangent)
    assert_same(tangents[0], tangents[1])


@pytest.mark.parametrize("name,args,kw,shape", MODULES, ids=IDS)
def test_func_grad_vjp_jacrev_jacfwd(name, args, kw, shape):
    ours, ref = pair(name, args, kw)
    x = torch.randn(shape, dtype=torch.float64)
    for transform in (lambda f: torch.func.grad(lambda x: f(x).pow(2).sum()),
                      lambda f: torch.func.jacrev(f), lambda f: torch.func.jacfwd(f)):
        assert_same(transform(first_output(ours))(x), transform(first_output(ref))(x))
    cot = torch.randn_like(first_output(ref)(x))
    got = torch.func.vjp(first_output(ours), x)[1](cot)[0]
    assert_same(got, torch.func.vjp(first_output(ref), x)[1](cot)[0])


def test_func_grad_of_parameters_and_hessian():
    ours, ref = pair("GRU", (2, 3), dict(num_layers=2))
    x = torch.randn(4, 2, 2, dtype=torch.float64)

    def loss(m):
        return lambda params, x: torch.func.functional_call(m, params, (x,))[0].pow(2).sum()
    params = {k: v.detach() for k, v in ours.named_parameters()}
    got = torch.func.grad(loss(ours))(params, x)
    want = torch.func.grad(loss(ref))(params, x)
    for k in want:
        assert_same(got[k], want[k])
    small = x[:2, :1]
    assert_same(torch.func.hessian(lambda x: ours(x)[0].sum())(small),
                torch.func.hessian(lambda x: ref(x)[0].sum())(small))


def test_vmap_of_grad_per_example_gradients():
    ours, ref = pair("LSTM", (3, 4), {})
    xs = torch.randn(5, 6, 2, 3, dtype=torch.float64)
    per_example = lambda m: torch.func.vmap(torch.func.grad(lambda x: m(x)[0].sum()))(xs)  # noqa: E731
    want = torch.stack([torch.func.grad(lambda x: ref(x)[0].sum())(x) for x in xs])
    assert_same(per_example(ours), want)


def test_transforms_say_they_ran_the_spec():
    m = fusedrnn.LSTM(3, 4, dtype=torch.float64)
    x = torch.randn(2, 1, 3, dtype=torch.float64)
    decisions = []

    def f(x):
        with fusedrnn.backends.recording_decisions() as d:
            y = m(x)[0]
        decisions.extend(d)
        return y
    torch.func.jvp(f, (x,), (torch.ones_like(x),))
    assert [d.chosen for d in decisions] == ["reference"]
    assert "torch.func transform (Jvp)" in str(decisions[0])


def test_op_itself_refuses_forward_mode_instead_of_a_zero_tangent():
    args = dict(x=torch.randn(3, 2, 4, dtype=torch.float64), h0=torch.zeros(2, 5, dtype=torch.float64),
                w_ih=torch.randn(5, 4, dtype=torch.float64), w_hh=torch.randn(5, 5, dtype=torch.float64))

    def op(x):
        return torch.ops.fusedrnn.rnn_layer("rnn_tanh", x, args["h0"], None, args["w_ih"], args["w_hh"], None,
                                            None, None, None, False, False)[0]
    with pytest.raises(RuntimeError, match="no forward-mode AD rule.*fusedrnn.functional.rnn_layer"):
        torch.func.jvp(op, (args["x"],), (torch.ones_like(args["x"]),))
    # the functional door gives torch.nn's tangent
    f = lambda x: fusedrnn.functional.rnn_layer("rnn_tanh", x, args["h0"], None, args["w_ih"], args["w_hh"])[0]  # noqa: E731
    tangent = torch.func.jvp(f, (args["x"],), (torch.ones_like(args["x"]),))[1]
    assert tangent.abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# vmap: over the data (folded into the batch: one kernel call), over the weights (model ensembling)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_vmap_over_examples_folds_into_one_call(cell, backend):
    if backend not in fusedrnn.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    m = getattr(fusedrnn, cell)(3, 4, dtype=torch.float64)
    xs = torch.randn(4, 5, 2, 3, dtype=torch.float64)
    lengths = torch.tensor([[5, 2], [1, 5], [3, 3], [0, 4]])
    with fusedrnn.use_backend(backend), fusedrnn.backends.recording_decisions() as calls, \
            warnings.catch_warnings():
        warnings.simplefilter("error")  # functorch's per-member fallback warns about its performance
        got = torch.func.vmap(lambda x, n: flatten(m(x, lengths=n)))(xs, lengths)
    assert len(calls) == 1 and calls[0].chosen == backend and "B=8" in calls[0].call
    for i in range(len(xs)):
        for g, w in zip(got, flatten(m(xs[i], lengths=lengths[i]))):
            torch.testing.assert_close(g[i], w, rtol=1e-12, atol=1e-12)


def test_vmap_over_batch_dim_and_training_through_it():
    m = fusedrnn.GRU(3, 4, dtype=torch.float64)
    twin = copy.deepcopy(m)
    xs = torch.randn(5, 2, 3, 3, dtype=torch.float64)  # mapped over dim 2
    got = torch.func.vmap(lambda x: m(x)[0], in_dims=2)(xs)
    want = torch.stack([twin(xs[:, :, i])[0] for i in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.pow(2).sum().backward()
    want.pow(2).sum().backward()
    for a, b in zip(m.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_vmap_model_ensemble():
    members = [fusedrnn.LSTM(3, 4, proj_size=2, dtype=torch.float64) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    got = torch.func.vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x,))[0])(params, buffers)
    torch.testing.assert_close(got, torch.stack([mm(x)[0] for mm in members]), rtol=1e-12, atol=1e-12)


def test_vmap_checks_every_mapped_length():
    m = fusedrnn.LSTM(3, 4)
    xs, lengths = torch.randn(2, 5, 2, 3), torch.tensor([[5, 2], [6, 1]])
    with pytest.raises(ValueError, match=r"lengths: expected every length in \[0, 5\].*max 6"):
        torch.func.vmap(lambda x, n: m(x, lengths=n)[0])(xs, lengths)


# ---------------------------------------------------------------------------------------------------------
# TorchScript: trace + save + load round trip; script and fx refuse clearly
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,args,kw,shape", MODULES, ids=IDS)
def test_jit_trace_save_load(name, args, kw, shape):
    ours, _ = pair(name, args, kw)
    x = torch.randn(shape, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python bools, as for torch.nn's RNNs
        traced = torch.jit.trace(ours, x)  # check_trace (on by default) reruns and compares the graph
    assert "fusedrnn::rnn_layer" in str(traced.inlined_graph)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x2 = torch.randn(shape, dtype=torch.float64)  # other values, same shape
    for got, want in zip(flatten(loaded(x2)), flatten(ours(x2))):
        # the trace runs the op, eager "auto" may run torch's kernels: fp64 rounding apart
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # the loaded module trains: the op's registered autograd
    flatten(loaded(x2))[0].pow(2).sum().backward()
    flatten(ours(x2))[0].pow(2).sum().backward()
    for (n, p), q in zip(loaded.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=n)


def test_jit_script_refuses_with_the_alternatives():
    model = nn.Sequential(nn.Linear(3, 3), fusedrnn.GRUCell(3, 4))
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile fusedrnn.nn.GRUCell.*torch.jit.trace"
                                           ".*fusedrnn.to_torch"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(model)


class _Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = fusedrnn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0]).relu()


def test_fx_symbolic_trace_refuses_and_fusedrnn_tracer_keeps_leaves():
    model = _Tagger()
    with pytest.raises(TypeError, match="fusedrnn.symbolic_trace"):
        torch.fx.symbolic_trace(model)
    gm = fusedrnn.symbolic_trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["rnn", "head"]
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# The isinstance story and torch.nn's attribute surface
# ---------------------------------------------------------------------------------------------------------
def test_is_recurrent():
    for m in (fusedrnn.LSTM(2, 3), fusedrnn.GRUCell(2, 3), nn.LSTM(2, 3), nn.RNNCell(2, 3)):
        assert fusedrnn.is_recurrent(m)
    for m in (nn.Linear(2, 3), nn.Sequential(fusedrnn.LSTM(2, 3))):
        assert not fusedrnn.is_recurrent(m)


# torch.nn attributes fusedrnn deliberately lacks, with the reason. Empty: all are present.
ABSENT_ON_PURPOSE: dict[str, str] = {}
PAIRS = [("LSTM", (2, 3)), ("GRU", (2, 3)), ("RNN", (2, 3)), ("LSTMCell", (2, 3)), ("GRUCell", (2, 3)),
         ("RNNCell", (2, 3))]


@pytest.mark.parametrize("name,args", PAIRS, ids=[p[0] for p in PAIRS])
def test_every_torch_nn_attribute_exists(name, args):
    kw = dict(proj_size=1) if name == "LSTM" else {}
    theirs, ours = getattr(nn, name)(*args, **kw), getattr(fusedrnn, name)(*args, **kw)
    module_names = set(dir(nn.Module()))
    missing = sorted(a for a in set(dir(theirs)) - module_names if not hasattr(ours, a) and a not in ABSENT_ON_PURPOSE)
    assert missing == []
    for attr in ("__constants__",):
        assert getattr(type(ours), attr) == getattr(type(theirs), attr)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_rnnbase_methods_behave_as_torch(name):
    ours, ref = pair(name, (3, 4), dict(num_layers=2, bidirectional=True, batch_first=True))
    x = torch.randn(5, 7, 3, dtype=torch.float64)  # B=5, T=7
    batch_sizes = torch.tensor([5, 4, 2])
    for m in (ours, ref):
        assert m.get_expected_hidden_size(x, None) == (4, 5, 4)
        assert m.get_expected_hidden_size(x[0], batch_sizes) == (4, 5, 4)
        m.check_input(x, None)
        assert m.mode == ref.mode
        assert m._weights_have_changed() is False
        m._init_flat_weights()
        m._update_flat_weights()
        assert [r() for r in m._flat_weight_refs] == list(m._flat_weights)
    h = torch.zeros(4, 5, 4, dtype=torch.float64)
    hidden = (h, h.clone()) if name == "LSTM" else h
    ours.check_forward_args(x, hidden, None)
    bad = torch.zeros(4, 6, 4, dtype=torch.float64)
    messages = []
    for m in (ours, ref):
        with pytest.raises(RuntimeError) as info:
            m.check_forward_args(x, (bad, h) if name == "LSTM" else bad, None)
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "(4, 5, 4)" in messages[0]
    with pytest.raises(ValueError, match="does not match weight dtype") as ours_err:
        ours.check_input(x.float(), None)
    with pytest.raises(ValueError) as ref_err:
        ref.check_input(x.float(), None)
    assert str(ours_err.value) == str(ref_err.value)
    perm = torch.tensor([4, 0, 3, 1, 2])
    state = torch.randn(4, 5, 4, dtype=torch.float64)
    args = (state, state * 2) if name == "LSTM" else state
    for got, want in zip(flatten(ours.permute_hidden(args, perm)), flatten(ref.permute_hidden(args, perm))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert ours.permute_hidden(args, None) is args
    if name == "LSTM":
        assert ours.get_expected_cell_size(x, None) == ref.get_expected_cell_size(x, None)
