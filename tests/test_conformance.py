"""Conformance with torch.nn on PyTorch's own test material (issue #20).

Generated from `torch.testing._internal.common_modules.module_db`: for the six RNN classes (nn.LSTM, GRU, RNN,
LSTMCell, GRUCell, RNNCell), every ModuleInfo sample input, in float32 and float64, in train and eval mode, on
every CPU backend, is run through the fusedrnn class and through torch.nn with the same weights, and checked:
  - outputs (and their shapes and dtypes),
  - the gradients of every input, hidden state and parameter for a fixed random cotangent,
  - in float64, the second derivatives (a backward of the first gradients, create_graph=True) with respect to
    every input and parameter;
the batched layer samples run a second time as a PackedSequence with unequal lengths. Every ModuleInfo error
input must raise the exception type and a message matching the regex PyTorch's own tests use. Then the
generic module protocol (parameter names and shapes, repr, mode, state_dict both ways, deepcopy/pickle),
gradgradcheck of the op and of the modules, and the cases the issue found (empty batch, zero sizes,
zero-length sequences, the dtype switch).

Case counts (collected): module_db has 87 samples (LSTM 32, GRU 16, RNN 32, LSTMCell 2, GRUCell 2, RNNCell 3)
x 2 dtypes x 2 modes x {reference, cpu} = 696 sample cases, 320 packed ones (80 layer samples x 2 dtypes
x 2 backends), 13 on triton (float32, every 8th sample), plus 116 error inputs (58 x 2 dtypes).
"""
from __future__ import annotations

import copy
import io
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import fusedrnn
from fusedrnn import functional
from helpers import compare_calls, detach_clone, flatten, in_fresh_thread, make_layer_args

CLASSES = ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell")
INFOS = {m.module_cls.__name__: m for m in module_db if m.module_cls.__name__ in CLASSES}
DTYPES = (torch.float32, torch.float64)
BACKENDS = [b for b in ("reference", "cpu") if b in fusedrnn.available_backends("cpu")]
TRITON = "triton" in fusedrnn.available_backends("cpu")  # under TRITON_INTERPRET=1 (tests/conftest.py)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_module_db_has_every_rnn_class():
    assert sorted(INFOS) == sorted(CLASSES)
    assert "cpu" in BACKENDS, f"the cpu backend is missing: {fusedrnn.extension_error()}"


def _samples(name, dtype, training):
    info = INFOS[name]
    torch.manual_seed(0)
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)


def _describe(name, sample) -> str:
    c = sample.constructor_input
    kw = dict(c.kwargs)
    if c.args:
        kw.update(dict(zip(("input_size", "hidden_size", "nonlinearity" if name == "RNNCell" else "bias"),
                           c.args)))
    parts = [f"I{kw.get('input_size')}", f"H{kw.get('hidden_size')}"]
    if kw.get("num_layers", 1) != 1:
        parts.append(f"L{kw['num_layers']}")
    if kw.get("proj_size"):
        parts.append(f"P{kw['proj_size']}")
    if kw.get("bidirectional"):
        parts.append("bi")
    if kw.get("batch_first"):
        parts.append("bf")
    if kw.get("bias") is False:
        parts.append("nobias")
    if kw.get("nonlinearity") == "relu":
        parts.append("relu")
    args = sample.forward_input.args
    parts.append("x" + "x".join(map(str, args[0].shape)))
    if len(args) > 1:
        parts.append("hx")
    return "-".join(parts)


def _case_ids():
    cases = []
    for name in CLASSES:
        for i, sample in enumerate(_samples(name, torch.float64, True)):
            cases.append(pytest.param(name, i, id=f"{name}-{i:02d}-{_describe(name, sample)}"))
    return cases


SAMPLE_CASES = _case_ids()
PACKED_CASES = [c for c in SAMPLE_CASES if c.values[0] in ("LSTM", "GRU", "RNN")]


# ---------------------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------------------
def _pair(name, dtype, constructor):
    """(torch.nn module, fusedrnn module) built from the same constructor input, with the same weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = INFOS[name].module_cls(*constructor.args, **constructor.kwargs, device="cpu", dtype=dtype)
        ours = getattr(fusedrnn, name)(*constructor.args, **constructor.kwargs, device="cpu", dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _compare_module_call(ref, ours, args, second_order: bool):
    return compare_calls(ref, ours, args, list(ref.parameters()), list(ours.parameters()), second_order)


# ---------------------------------------------------------------------------------------------------------
# module_db samples
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name,index", SAMPLE_CASES)
def test_module_db_sample(name, index, dtype, training, backend):
    sample = _samples(name, dtype, training)[index]
    ref, ours = _pair(name, dtype, sample.constructor_input)
    ref.train(training)
    ours.train(training)
    _compare_on(backend, ref, ours, sample.forward_input.args, second_order=dtype == torch.float64)


def _compare_on(backend, ref, ours, args, second_order):
    def run():
        with fusedrnn.use_backend(backend):
            return _compare_module_call(ref, ours, args, second_order)
    return in_fresh_thread(run)


TRITON_CASES = [c for c in SAMPLE_CASES if c.values[1] % 8 == 0]  # every 8th sample of each class: 13
# The GPU kernels on the CPU: Triton's interpreter and the CUDA emulator (backend cuda-emu, csrc/emu).
KERNEL_BACKENDS = [b for b in ("triton", "cuda-emu") if b in fusedrnn.available_backends("cpu")]


@pytest.mark.skipif(not KERNEL_BACKENDS, reason="neither triton nor the CUDA emulator is available here")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name,index", TRITON_CASES)
def test_module_db_sample_gpu_kernels(name, index, backend):
    """The GPU kernels run on the CPU (Triton's interpreter, the CUDA emulator; ~1 s a case) on a subset of the
    samples, in float32 (neither takes float64), second derivatives included."""
    sample = _samples(name, torch.float32, True)[index]
    ref, ours = _pair(name, torch.float32, sample.constructor_input)
    _compare_on(backend, ref, ours, sample.forward_input.args, second_order=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name,index", PACKED_CASES)
def test_module_db_sample_packed(name, index, dtype, backend):
    """Each layer sample again as a batch of 3 sequences (the sample's, -0.5 times it, its reverse in time)
    with unequal, unsorted lengths, as a PackedSequence; a given hx is batched the same way."""
    sample = _samples(name, dtype, True)[index]
    ref, ours = _pair(name, dtype, sample.constructor_input)
    x, *rest = [a.detach() if isinstance(a, torch.Tensor) else a for a in sample.forward_input.args]
    if x.dim() == 3:  # module_db's layer samples are unbatched; keep this right if one ever is not
        x = (x.transpose(0, 1) if ref.batch_first else x)[:, 0]
    T = x.shape[0]
    batch = torch.stack([x, -0.5 * x, x.flip(0)], 1)  # [T, 3, I]
    lengths = [max(1, T - 1), T, 1]
    packed = pack_padded_sequence(batch, lengths, enforce_sorted=False)
    packed = packed._replace(data=packed.data.requires_grad_())
    if rest:
        def widen(h):
            return torch.stack([h.detach(), 0.5 * h.detach(), -h.detach()], 1).requires_grad_()
        rest = [tuple(widen(h) for h in rest[0]) if isinstance(rest[0], tuple) else widen(rest[0])]
    _compare_on(backend, ref, ours, (packed, *rest), second_order=dtype == torch.float64)


# ---------------------------------------------------------------------------------------------------------
# module_db error inputs: same exception type, message matching PyTorch's own regex
# ---------------------------------------------------------------------------------------------------------
def _error_cases():
    cases = []
    for name in CLASSES:
        info = INFOS[name]
        errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                               training=True)
        for i, e in enumerate(errors):
            slug = re.sub(r"[^A-Za-z0-9]+", "_", e.error_regex)[:40].strip("_")
            cases.append(pytest.param(name, i, id=f"{name}-{i:02d}-{e.error_type.__name__}-{slug}"))
    return cases


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name,index", _error_cases())
def test_module_db_error_input(name, index, dtype):
    info = INFOS[name]
    torch.manual_seed(0)
    error = info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                          training=True)[index]
    c = error.module_error_input.constructor_input
    for namespace in (torch.nn, fusedrnn):  # torch.nn first: the regex is PyTorch's, checked on torch.nn too
        cls = getattr(namespace, name)
        with warnings.catch_warnings(), pytest.raises(error.error_type, match=error.error_regex):
            warnings.simplefilter("ignore")
            if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
                cls(*c.args, **c.kwargs)
            else:
                m = cls(*c.args, **c.kwargs)
                f = error.module_error_input.forward_input
                m(*f.args, **f.kwargs)


# ---------------------------------------------------------------------------------------------------------
# More errors (the list): the exception type and the exact message of torch.nn
# ---------------------------------------------------------------------------------------------------------
X3, H1 = torch.zeros(2, 2, 3), torch.zeros(1, 2, 4)
SAME_ERROR = [
    ("GRUCell-hx-4D", lambda nn: nn.GRUCell(10, 20)(torch.randn(3, 10), torch.randn(3, 1, 1, 20))),
    ("GRUCell-hx-4D-input-f64", lambda nn: nn.GRUCell(10, 20)(torch.randn(3, 10, dtype=torch.float64),
                                                              torch.randn(3, 1, 1, 20))),
    ("RNNCell-hx-3D", lambda nn: nn.RNNCell(10, 20)(torch.randn(3, 10), torch.randn(1, 3, 20))),
    ("LSTMCell-cx-4D", lambda nn: nn.LSTMCell(10, 20)(torch.randn(3, 10), (torch.randn(3, 20),
                                                                           torch.randn(3, 1, 1, 20)))),
    ("LSTMCell-cx-batch", lambda nn: nn.LSTMCell(10, 20)(torch.randn(3, 10), (torch.randn(3, 20),
                                                                              torch.randn(5, 20)))),
    ("LSTMCell-cx-size", lambda nn: nn.LSTMCell(10, 20)(torch.randn(3, 10), (torch.randn(3, 20),
                                                                             torch.randn(3, 21)))),
    ("GRUCell-hx-2D-unbatched", lambda nn: nn.GRUCell(10, 20)(torch.randn(10), torch.randn(1, 20))),
    ("GRUCell-hx-1D-batched", lambda nn: nn.GRUCell(10, 20)(torch.randn(3, 10), torch.randn(20))),
    ("GRU-proj_size", lambda nn: nn.GRU(30, 20, 2, proj_size=10)),
    ("RNN-proj_size", lambda nn: nn.RNN(30, 20, proj_size=10)),
    ("LSTM-bias-str", lambda nn: nn.LSTM(3, 4, bias="True")),
    ("GRU-batch_first-int", lambda nn: nn.GRU(3, 4, batch_first=1)),
    ("LSTM-proj-negative", lambda nn: nn.LSTM(3, 4, proj_size=-1)),
    ("LSTM-proj-hidden", lambda nn: nn.LSTM(3, 4, proj_size=4)),
    ("LSTM-dropout-2", lambda nn: nn.LSTM(3, 4, dropout=2)),
    ("LSTMCell-hidden-float", lambda nn: nn.LSTMCell(3, 4.0)),
    ("RNN-input-4D", lambda nn: nn.RNN(3, 4)(torch.zeros(2, 2, 2, 3))),
    ("GRU-input-1D", lambda nn: nn.GRU(3, 4)(torch.zeros(3))),
    ("LSTM-T0", lambda nn: nn.LSTM(3, 4)(torch.zeros(0, 2, 3))),
    ("GRU-T0-unbatched", lambda nn: nn.GRU(3, 4)(torch.zeros(0, 3))),
    ("LSTM-input-size", lambda nn: nn.LSTM(3, 4)(torch.zeros(2, 2, 5))),
    ("LSTM-input-f64", lambda nn: nn.LSTM(3, 4)(X3.double())),
    ("GRU-packed-input-f64", lambda nn: nn.GRU(3, 4)(pack_padded_sequence(X3.double(), [2, 1]))),
    ("LSTM-proj-h0-size", lambda nn: nn.LSTM(3, 4, proj_size=2)(X3, (H1, H1))),
    ("LSTM-c0-rank", lambda nn: nn.LSTM(3, 4)(X3, (H1, torch.zeros(2, 4)))),
    ("LSTM-unbatched-h0-rank", lambda nn: nn.LSTM(3, 4)(X3[0], (H1, H1))),
    ("LSTM-hx-3-states", lambda nn: nn.LSTM(3, 4)(X3, (H1, H1, H1))),
    ("GRU-h0-batch", lambda nn: nn.GRU(3, 4)(X3, torch.zeros(1, 3, 4))),
    ("GRU-unbatched-h0-size", lambda nn: nn.GRU(3, 4)(X3[0], torch.zeros(1, 5))),
    ("RNN-h0-rank", lambda nn: nn.RNN(3, 4)(X3, torch.zeros(2, 4))),
    ("RNN-unbatched-h0-rank", lambda nn: nn.RNN(3, 4)(X3[0], H1)),
]


@pytest.mark.parametrize("fn", [c[1] for c in SAME_ERROR], ids=[c[0] for c in SAME_ERROR])
def test_error_like_torch(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(torch.nn)
    except Exception as e:  # noqa: BLE001
        want = e
    else:
        pytest.fail("torch.nn accepts this")
    with warnings.catch_warnings(), pytest.raises(type(want)) as got:
        warnings.simplefilter("ignore")
        fn(fusedrnn)
    assert type(got.value) is type(want) and str(got.value) == str(want)


# ---------------------------------------------------------------------------------------------------------
# Generic module protocol
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,index", SAMPLE_CASES)
def test_module_protocol(name, index):
    in_fresh_thread(_check_module_protocol, name, index)


def _check_module_protocol(name, index):
    sample = _samples(name, torch.float64, True)[index]
    ref, ours = _pair(name, torch.float64, sample.constructor_input)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert repr(ours) == repr(ref)
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "bidirectional",
                 "proj_size", "dropout", "nonlinearity"):
        assert getattr(ours, attr, None) == getattr(ref, attr, None), attr
    ref.load_state_dict(ours.state_dict())  # both ways
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(ours), torch.load(buf, weights_only=False)):
        args = detach_clone(sample.forward_input.args)
        for a, b in zip(flatten(clone(*args)), flatten(ours(*args))):
            assert torch.equal(a, b)
    ours.float()
    assert all(p.dtype == torch.float32 for p in ours.parameters())


# ---------------------------------------------------------------------------------------------------------
# gradgradcheck (fp64): the op on each backend, and the modules
# ---------------------------------------------------------------------------------------------------------
OP_CASES = [("lstm", 0, None, False), ("lstm", 2, [3, 1], True), ("gru", 0, [2, 3], False),
            ("gru", 0, None, True), ("rnn_tanh", 0, [3, 0], False), ("rnn_relu", 0, None, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell,proj,lengths,reverse", OP_CASES,
                         ids=[f"{c}-P{p}-{'len' if l else 'full'}-{'rev' if r else 'fwd'}" for c, p, l, r in OP_CASES])
def test_op_gradgradcheck(cell, proj, lengths, reverse, backend):
    args = make_layer_args(cell, T=3, B=2, I=2, H=3, proj=proj, lengths=lengths, reverse=reverse)
    names = [n for n, t in args.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    tensors = [args[n] for n in names]

    def f(*ts):
        return [o for o in functional.rnn_layer(cell, **{**args, **dict(zip(names, ts))}) if o is not None]

    def run():
        with fusedrnn.use_backend(backend):
            assert torch.autograd.gradcheck(f, tensors, check_batched_grad=True, fast_mode=True)
            assert torch.autograd.gradgradcheck(f, tensors, fast_mode=True)
    in_fresh_thread(run)


MODULE_GRADGRAD = [("LSTM", (2, 3), dict(bidirectional=True, proj_size=2)),
                   ("GRU", (2, 3), dict(batch_first=True)), ("RNN", (2, 3), dict(nonlinearity="tanh")),
                   ("LSTMCell", (2, 3), {}), ("GRUCell", (2, 3), {}), ("RNNCell", (2, 3), {})]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,args,kw", MODULE_GRADGRAD, ids=[c[0] for c in MODULE_GRADGRAD])
def test_module_gradgradcheck(name, args, kw, backend):
    m = getattr(fusedrnn, name)(*args, **kw, dtype=torch.float64)
    x = torch.randn((2, 2, 2) if "Cell" not in name else (2, 2), dtype=torch.float64, requires_grad=True)
    params = list(m.parameters())

    def f(x, *ps):
        out = torch.func.functional_call(m, dict(zip([n for n, _ in m.named_parameters()], ps)), (x,))
        return flatten(out)

    def run():
        with fusedrnn.use_backend(backend):
            assert torch.autograd.gradgradcheck(f, (x, *params), check_batched_grad=True, fast_mode=True)
    in_fresh_thread(run)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gru_cell_second_derivative_is_torchs(backend):
    """The issue's example: GRUCell d2/dx2 came out [0, 0] on the reference backend (torch: nonzero)."""
    torch.manual_seed(0)
    ref = torch.nn.GRUCell(2, 2, dtype=torch.float64)
    ours = fusedrnn.GRUCell(2, 2, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    def second(m):
        x = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)
        with fusedrnn.use_backend(backend):
            g, = torch.autograd.grad(m(x).sum(), x, create_graph=True)
            return torch.autograd.grad(g.sum(), x)[0]
    results = [in_fresh_thread(second, m) for m in (ref, ours)]
    assert results[0].abs().min() > 1e-3
    torch.testing.assert_close(results[1], results[0])


# ---------------------------------------------------------------------------------------------------------
# The cases: empty batch, zero sizes, zero-length sequences, the dtype switch
# ---------------------------------------------------------------------------------------------------------
EMPTY = [("LSTM", (3, 4), {}), ("LSTM", (3, 4), dict(bidirectional=True, num_layers=2, proj_size=2)),
         ("GRU", (3, 4), {}), ("GRU", (3, 4), dict(bidirectional=True, batch_first=True)),
         ("RNN", (3, 4), {}), ("RNN", (3, 4), dict(bidirectional=True, nonlinearity="relu"))]


@pytest.mark.parametrize("backend", BACKENDS + ["triton"] * TRITON)
@pytest.mark.parametrize("name,args,kw", EMPTY, ids=[f"{c[0]}-{'-'.join(c[2]) or 'plain'}" for c in EMPTY])
def test_empty_batch_like_torch(name, args, kw, backend):
    ref, ours = _pair(name, torch.float32, type("C", (), {"args": args, "kwargs": kw})())
    x = torch.zeros((0, 5, 3) if kw.get("batch_first") else (5, 0, 3), requires_grad=True)
    _compare_on(backend, ref, ours, (x,), second_order=False)
    h = torch.zeros(ref.num_layers * (2 if ref.bidirectional else 1), 0, ref.proj_size or ref.hidden_size)
    hx = (h, torch.zeros(*h.shape[:2], ref.hidden_size)) if name == "LSTM" else h
    _compare_on(backend, ref, ours, (x, hx), second_order=False)


CELLS_ZERO = [("LSTMCell", (3, 0), (2, 3)), ("GRUCell", (3, 0), (2, 3)), ("RNNCell", (3, 0), (2, 3)),
              ("LSTMCell", (0, 4), (2, 0)), ("GRUCell", (3, 4), (0, 3)), ("RNNCell", (0, 4), (0, 0)),
              ("GRUCell", (3, 0), (3,))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,args,xshape", CELLS_ZERO, ids=[f"{n}-I{a[0]}-H{a[1]}-x{'x'.join(map(str, s))}"
                                                              for n, a, s in CELLS_ZERO])
def test_cell_zero_sizes_like_torch(name, args, xshape, backend):
    ref, ours = _pair(name, torch.float64, type("C", (), {"args": args, "kwargs": {}})())
    x = torch.randn(xshape, dtype=torch.float64, requires_grad=True)
    _compare_on(backend, ref, ours, (x,), second_order=True)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("shape", [(0, 2, 3), (0, 3)], ids=["batched", "unbatched"])
def test_zero_length_sequence_raises_like_torch(name, shape):
    for ns in (torch.nn, fusedrnn):
        with pytest.raises(RuntimeError, match=r"^Expected sequence length to be larger than 0 in RNN$"):
            getattr(ns, name)(3, 4)(torch.zeros(shape))


def test_mode_attribute():
    for ns in (torch.nn, fusedrnn):
        assert [m.mode for m in (ns.LSTM(2, 3), ns.GRU(2, 3), ns.RNN(2, 3), ns.RNN(2, 3, nonlinearity="relu"))] \
            == ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]


DTYPE_SWITCH = """
import torch, fusedrnn
with fusedrnn.use_backend({backend!r}):
    m = fusedrnn.LSTM(2, 3)
    m(torch.randn(2, 2, requires_grad=True))[0].sum().backward()
    y = m.double()(torch.randn(2, 2, dtype=torch.float64))[0]
    assert y.dtype == torch.float64 and y.shape == (2, 3)
print("ok")
"""


def run_fresh(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Runs `code` in a new interpreter (the state of this process cannot hide or cause the failure; a crash is
    a failing test, not a dead test run)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_call_after_float32_call(backend):
    """Whether a call works must not depend on what ran before it (here: an fp32 forward/backward)."""
    r = run_fresh(DTYPE_SWITCH.format(backend=backend))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
