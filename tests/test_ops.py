"""The torch.library ops: gradcheck through functional.rnn_layer, opcheck of both ops (schema, fake, autograd
registration, AOT dispatch), torch.compile(fullgraph=True) of modules, and the need_workspace contract."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedrnn
from fusedrnn import functional, ops, use_backend
from fusedrnn.backends import workspace_width
from helpers import CELLS, assert_close_to_reference, make_layer_args, tensor_args

F64 = torch.float64
DIFFERENTIABLE = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


def _layer_id(cell, proj=0, bias=True, reverse=False, lengths=None):
    parts = [cell, f"P{proj}" if proj else "", "" if bias else "nobias", "rev" if reverse else "",
             f"len{','.join(map(str, lengths))}" if lengths else ""]
    return "-".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------------------
# gradcheck: every differentiable input of functional.rnn_layer
# ---------------------------------------------------------------------------------------------------------
GRADCHECK_CASES = [dict(cell=c) for c in CELLS] + \
    [dict(cell=c, reverse=True, lengths=[3, 1, 0]) for c in CELLS] + \
    [dict(cell=c, lengths=[2, 3, 1], bias=False) for c in CELLS] + \
    [dict(cell="lstm", proj=1), dict(cell="lstm", proj=2, reverse=True, lengths=[1, 3, 2]),
     dict(cell="lstm", proj=1, bias=False, lengths=[3, 0, 2])]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[_layer_id(**c) for c in GRADCHECK_CASES])
def test_gradcheck_rnn_layer(case, backend):
    case = dict(case)
    cell = case.pop("cell")
    B = 3
    args = make_layer_args(cell, T=3, B=B, I=2, H=3, seed=5, **case)
    inputs = tensor_args(args)
    names = list(inputs)
    expected = {n for n in DIFFERENTIABLE if args.get(n) is not None}
    assert set(names) == expected  # every differentiable input is checked

    def fn(*tensors):
        y, h, c = functional.rnn_layer(cell, **{**args, **dict(zip(names, tensors))})
        return (y, h) if c is None else (y, h, c)

    with use_backend(backend):
        assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# opcheck: schema, fake tensor, autograd registration, AOT dispatch (static and dynamic shapes)
# ---------------------------------------------------------------------------------------------------------
OPCHECK_CASES = [dict(cell=c) for c in CELLS] + \
    [dict(cell=c, reverse=True, lengths=[4, 1, 3]) for c in CELLS] + \
    [dict(cell="gru", bias=False), dict(cell="rnn_relu", bias=False, lengths=[1, 4, 4])] + \
    [dict(cell="lstm", proj=2), dict(cell="lstm", proj=2, bias=False, reverse=True, lengths=[2, 4, 1])]


def _op_args(cell, proj=0, bias=True, reverse=False, lengths=None, need_workspace=True, requires_grad=True):
    a = make_layer_args(cell, T=4, B=3, I=3, H=4, proj=proj, bias=bias, reverse=reverse, lengths=lengths,
                        requires_grad=requires_grad)
    return (cell, a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"], a["lengths"],
            reverse, need_workspace)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[_layer_id(**c) for c in OPCHECK_CASES])
def test_opcheck_rnn_layer(case):
    torch.library.opcheck(torch.ops.fusedrnn.rnn_layer.default, _op_args(**case))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_opcheck_rnn_layer_no_workspace(cell):
    torch.library.opcheck(torch.ops.fusedrnn.rnn_layer.default,
                          _op_args(cell, need_workspace=False, requires_grad=False))


def _backward_args(case, noncontiguous_x=False):
    args = list(_op_args(**case, requires_grad=False))
    if noncontiguous_x:  # as the modules pass it with batch_first=True: a transposed view
        args[1] = args[1].transpose(0, 1).contiguous().transpose(0, 1)
        assert not args[1].is_contiguous()
    y, h_n, c_n, workspace = torch.ops.fusedrnn.rnn_layer(*args)
    g = torch.Generator().manual_seed(2)
    grad = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)  # noqa: E731
    return (*args[:-1], y, workspace, grad(y), grad(h_n), grad(c_n) if case["cell"] == "lstm" else None)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[_layer_id(**c) for c in OPCHECK_CASES])
def test_opcheck_rnn_layer_backward(case):
    torch.library.opcheck(torch.ops.fusedrnn.rnn_layer_backward.default, _backward_args(case))


@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_noncontiguous_input(cell):
    """The fake kernels must describe the real outputs' strides also for a non-contiguous x (batch_first
    modules pass a transposed view); inductor asserts them."""
    case = dict(cell=cell, lengths=[4, 2, 3])
    args = list(_op_args(**case))
    args[1] = args[1].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    torch.library.opcheck(torch.ops.fusedrnn.rnn_layer.default, tuple(args))
    torch.library.opcheck(torch.ops.fusedrnn.rnn_layer_backward.default, _backward_args(case, noncontiguous_x=True))


# ---------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): forward and backward equal eager
# ---------------------------------------------------------------------------------------------------------
class Model(torch.nn.Module):
    def __init__(self, rnn: torch.nn.Module, out_features: int):
        super().__init__()
        self.rnn = rnn
        self.head = torch.nn.Linear(out_features, 2, dtype=F64)

    def forward(self, x, hx=None, lengths=None):
        if lengths is None:
            y, state = self.rnn(x, hx)
        else:
            y, state = self.rnn(x, hx, lengths=lengths)
        state = state if isinstance(state, tuple) else (state,)
        return (torch.tanh(self.head(y)),) + state


class CellModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = fusedrnn.LSTMCell(3, 5, dtype=F64)

    def forward(self, xs):
        h = c = None
        for x in xs.unbind(0):
            h, c = self.cell(x, None if h is None else (h, c))
        return h, c


def _compare_compiled(model, args, backend):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    params = list(model.parameters())
    diff_args = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    results = []
    for fn in (model, compiled):
        outs = fn(*args)
        g = torch.Generator().manual_seed(3)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=F64)).sum() for o in outs)
        grads = torch.autograd.grad(loss, diff_args + params)
        results.append((outs, grads))
    (eager_outs, eager_grads), (comp_outs, comp_grads) = results
    assert len(comp_outs) == len(eager_outs)
    for i, (c, e) in enumerate(zip(comp_outs, eager_outs)):
        assert_close_to_reference(f"output {i}", c, e)
    names = [f"arg{i}" for i in range(len(diff_args))] + [n for n, _ in model.named_parameters()]
    for n, c, e in zip(names, comp_grads, eager_grads):
        assert_close_to_reference(f"grad {n}", c, e)


def _x(*shape):
    return torch.randn(*shape, dtype=F64, requires_grad=True)


@pytest.mark.slow
def test_compile_inductor_lstm():
    """The default backend (inductor) once: a bidirectional batch_first LSTM with lengths. Inductor's caches
    are off: their keys do not cover the ops' fake kernels, so a cached graph could hide a fix or a bug."""
    model = Model(fusedrnn.LSTM(3, 5, bidirectional=True, batch_first=True, dtype=F64), 10)
    h0, c0 = _x(2, 3, 5), _x(2, 3, 5)
    with torch.compiler.config.patch(force_disable_caches=True):
        _compare_compiled(model, (_x(3, 6, 3), (h0, c0), torch.tensor([6, 2, 4])), backend="inductor")


COMPILE_CASES = {
    "lstm-L2-bi-P2-bf-lengths": lambda: (
        Model(fusedrnn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, batch_first=True, dtype=F64), 4),
        (_x(3, 6, 3), None, torch.tensor([6, 2, 4]))),
    "gru-L2-bi-hx": lambda: (Model(fusedrnn.GRU(3, 4, num_layers=2, bidirectional=True, dtype=F64), 8),
                             (_x(5, 2, 3), _x(4, 2, 4))),
    "rnn_relu-L2-unbatched": lambda: (Model(fusedrnn.RNN(3, 4, num_layers=2, nonlinearity="relu", dtype=F64), 4),
                                      (_x(5, 3),)),
    "rnn_tanh-nobias-lengths": lambda: (Model(fusedrnn.RNN(3, 4, bias=False, dtype=F64), 4),
                                        (_x(5, 3, 3), None, torch.tensor([5, 1, 3]))),
    "lstmcell-T3xB2": lambda: (CellModel(), (_x(3, 2, 3),)),
}


@pytest.mark.parametrize("make", list(COMPILE_CASES.values()), ids=list(COMPILE_CASES))
def test_compile_aot_eager(make):
    model, args = make()
    _compare_compiled(model, args, backend="aot_eager")


# ---------------------------------------------------------------------------------------------------------
# need_workspace: only when a gradient is needed
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def fused_backend():
    """The workspace belongs to the fused backends: these tests name one ('auto' may pick torch's kernels)."""
    with fusedrnn.use_backend("cpu" if "cpu" in fusedrnn.available_backends("cpu") else "reference"):
        yield


@pytest.fixture
def op_calls(monkeypatch, fused_backend):
    """Records (cell, T, B, H, has projection, need_workspace, workspace shape) of every fusedrnn op call."""
    calls = []
    real = ops.run_layer

    def spy(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, need_workspace):
        out = real(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, need_workspace)
        H = w_hh.shape[0] // {"lstm": 4, "gru": 3}.get(cell, 1)
        calls.append((cell, x.shape[0], x.shape[1], H, w_hr is not None, need_workspace, tuple(out[3].shape)))
        return out

    monkeypatch.setattr(ops, "run_layer", spy)
    return calls


MODULES = {
    "lstm-L2-bi": lambda: fusedrnn.LSTM(3, 4, num_layers=2, bidirectional=True),
    "lstm-P2": lambda: fusedrnn.LSTM(3, 4, proj_size=2),
    "gru-L2": lambda: fusedrnn.GRU(3, 4, num_layers=2),
    "rnn_tanh": lambda: fusedrnn.RNN(3, 4),
    "lstmcell": lambda: fusedrnn.LSTMCell(3, 4),
}


def _run(m):
    x = torch.randn(2, 3) if isinstance(m, fusedrnn.LSTMCell) else torch.randn(5, 2, 3)
    return m, x


@pytest.mark.parametrize("make", list(MODULES.values()), ids=list(MODULES))
def test_no_workspace_without_grad(make, op_calls):
    m, x = _run(make())
    with torch.no_grad():  # parameters require grad, but no graph is recorded
        m(x)
    n = len(op_calls)
    assert n >= 1
    m.requires_grad_(False)  # nothing requires grad, grad mode on
    m(x)
    assert len(op_calls) == 2 * n
    for call in op_calls:
        assert call[5] is False and call[6] == (0,), call


@pytest.mark.parametrize("make", list(MODULES.values()), ids=list(MODULES))
def test_workspace_with_grad(make, op_calls):
    m, x = _run(make())
    out = m(x)  # parameters require grad
    x_grad_only = x.clone().requires_grad_()
    m.requires_grad_(False)
    out2 = m(x_grad_only)  # only the input requires grad
    assert op_calls
    for cell, T, B, H, proj, need_workspace, shape in op_calls:
        assert need_workspace is True
        assert shape == (T, B, workspace_width(cell, H, proj))
    first = out[0] if isinstance(out, tuple) else out
    second = out2[0] if isinstance(out2, tuple) else out2
    assert first.requires_grad and second.requires_grad


def test_op_without_workspace_cannot_be_differentiated():
    args = _op_args("lstm", need_workspace=False)
    y, h_n, c_n, workspace = torch.ops.fusedrnn.rnn_layer(*args)
    assert workspace.shape == (0,)
    with pytest.raises(RuntimeError, match=r"called with need_workspace=False, so it cannot be differentiated"):
        y.sum().backward()


def test_functional_lengths_padding_exact_zero():
    """functional.rnn_layer with lengths: outputs past each length are exactly zero, in both directions, and
    match torch.nn fed the PackedSequence."""
    lengths = [5, 2, 3]
    for cell in CELLS:
        args = make_layer_args(cell, T=6, B=3, I=3, H=4, lengths=lengths, requires_grad=False)
        for reverse in (False, True):
            y, h, c = functional.rnn_layer(cell, **{**args, "reverse": reverse})
            for b, n in enumerate(lengths):
                assert (y[n:, b] == 0).all()
        name = {"lstm": "LSTM", "gru": "GRU"}.get(cell, "RNN")
        kw = {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}
        m = getattr(torch.nn, name)(3, 4, dtype=F64, **kw)
        with torch.no_grad():
            for p, k in zip(m.parameters(), ("w_ih", "w_hh", "b_ih", "b_hh")):
                p.copy_(args[k])
        hx = (args["h0"][None], args["c0"][None]) if cell == "lstm" else args["h0"][None]
        out, state = m(pack_padded_sequence(args["x"], lengths, enforce_sorted=False), hx)
        out, _ = pad_packed_sequence(out, total_length=6)
        y, h, c = functional.rnn_layer(cell, **args)
        assert_close_to_reference("y", y, out)
        assert_close_to_reference("h_n", h, (state[0] if cell == "lstm" else state)[0])


# ---------------------------------------------------------------------------------------------------------
# Eager fast path (ops.run_layer): plain eager calls skip the custom op; modes and tracing see the op
# ---------------------------------------------------------------------------------------------------------
class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _PassThroughFunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_dispatch_mode_sees_the_op():
    m = fusedrnn.GRU(3, 4, num_layers=2)
    with _RecordOps() as rec:
        m(torch.randn(5, 2, 3))
    assert sum("fusedrnn.rnn_layer.default" in op for op in rec.ops) == 2, rec.ops


@pytest.mark.parametrize("make", list(MODULES.values()), ids=list(MODULES))
def test_fast_path_and_op_path_agree(make, monkeypatch, fused_backend):
    """The same call eagerly (autograd.Function) and through the custom op (forced by a function mode):
    identical outputs and gradients, bit for bit."""
    op_calls = []
    real_op = ops.rnn_layer
    monkeypatch.setattr(ops, "rnn_layer", lambda *args: op_calls.append(1) or real_op(*args))
    m, x = _run(make())
    m.double()
    x = x.double().requires_grad_()
    results = []
    for mode in (None, _PassThroughFunctionMode()):
        m.zero_grad()
        x.grad = None
        ctx = mode if mode is not None else contextlib.nullcontext()
        with ctx:
            out = m(x)
        flat = [o for o in (out if isinstance(out, tuple) else (out,)) for o in (o if isinstance(o, tuple) else (o,))]
        sum(o.sum() for o in flat).backward()
        results.append([o.detach().clone() for o in flat] + [x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
        assert bool(op_calls) == (mode is not None)  # eager skipped the op; the mode forced it
    for a, b in zip(*results):
        assert torch.equal(a, b)
