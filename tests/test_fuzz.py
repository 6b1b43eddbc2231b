"""Property-based fuzzing against torch.nn (issue #20), with hypothesis.

Each example draws a module (LSTM, GRU, RNN tanh/relu, or a cell), its sizes (0 and 1 included where torch.nn
allows them: batch 0 everywhere, input and hidden size 0 for cells), layers, directions, batch_first,
projection, bias, dtype, an unbatched input, lengths (as a PackedSequence, or as fusedrnn's lengths= compared
with torch.nn on the packed batch), hx given or not; then runs fusedrnn on every CPU backend and torch.nn with
the same weights and compares outputs and every gradient (float64: second derivatives too).

CI runs FUZZ_EXAMPLES examples per test with a fixed seed (derandomize: the same examples every run, about
30 s on 2 cores). The `slow` tests run FUZZ_EXAMPLES_SLOW new random examples each (about 10 minutes); they are
opt-in -- `python -m pytest tests/test_fuzz.py -m slow` -- because the plain test command runs every marker.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedrnn
from helpers import compare_calls, in_fresh_thread

BACKENDS = [b for b in ("reference", "cpu") if b in fusedrnn.available_backends("cpu")]
FUZZ_EXAMPLES = 150
FUZZ_EXAMPLES_SLOW = 1500
CI = settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
SLOW = settings(CI, max_examples=FUZZ_EXAMPLES_SLOW, derandomize=False)


@st.composite
def layer_cases(draw):
    name = draw(st.sampled_from(["LSTM", "GRU", "RNN-tanh", "RNN-relu"]))
    H = draw(st.integers(1, 5))
    kw = dict(input_size=draw(st.integers(1, 5)), hidden_size=H, num_layers=draw(st.integers(1, 2)),
              bias=draw(st.booleans()), batch_first=draw(st.booleans()), bidirectional=draw(st.booleans()))
    if name == "LSTM" and H > 1 and draw(st.booleans()):
        kw["proj_size"] = draw(st.integers(1, H - 1))
    if name.startswith("RNN"):
        kw["nonlinearity"] = name[4:]
    T, B = draw(st.integers(1, 4)), draw(st.integers(0, 3))
    unbatched = draw(st.booleans())
    mode = "plain" if unbatched or B == 0 else draw(st.sampled_from(["plain", "packed", "lengths"]))
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B)) if mode != "plain" else None
    return dict(name=name.split("-")[0], kw=kw, T=T, B=1 if unbatched else B, unbatched=unbatched, mode=mode,
                lengths=lengths, hx=draw(st.booleans()), dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def _run_layer_case(case, backend):
    torch.manual_seed(case["seed"])
    dtype, kw, T, B = case["dtype"], case["kw"], case["T"], case["B"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(torch.nn, case["name"])(**kw, dtype=dtype)
        ours = getattr(fusedrnn, case["name"])(**kw, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, kw["input_size"], dtype=dtype)
    D = 2 if kw["bidirectional"] else 1
    h_out = kw.get("proj_size") or kw["hidden_size"]
    hx = None
    if case["hx"]:
        h = torch.randn(kw["num_layers"] * D, B, h_out, dtype=dtype)
        c = torch.randn(kw["num_layers"] * D, B, kw["hidden_size"], dtype=dtype)
        hx = (h, c) if case["name"] == "LSTM" else h
        if case["unbatched"]:
            hx = tuple(t[:, 0] for t in hx) if isinstance(hx, tuple) else hx[:, 0]
    if case["unbatched"]:
        x = x[:, 0]
    elif kw["batch_first"]:
        x = x.transpose(0, 1).contiguous()
    x.requires_grad_()
    hx_args = () if hx is None else (tuple(t.requires_grad_() for t in hx) if isinstance(hx, tuple)
                                      else hx.requires_grad_(),)
    second = dtype == torch.float64
    lengths, bf = case["lengths"], kw["batch_first"]

    if case["mode"] == "plain":
        ref_fn, our_fn = ref, ours
    elif case["mode"] == "packed":
        def ref_fn(x, *h):
            return ref(pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False), *h)
        our_fn = lambda x, *h: ours(pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False), *h)  # noqa: E731
    else:  # fusedrnn's lengths= on the padded batch == torch.nn on the packed batch, padded back with zeros
        def ref_fn(x, *h):
            y, state = ref(pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False), *h)
            return pad_packed_sequence(y, batch_first=bf, total_length=T)[0], state

        def our_fn(x, *h):
            return ours(x, *h, lengths=lengths)

    with fusedrnn.use_backend(backend):
        compare_calls(ref_fn, our_fn, (x, *hx_args), list(ref.parameters()), list(ours.parameters()), second)


@st.composite
def cell_cases(draw):
    name = draw(st.sampled_from(["LSTMCell", "GRUCell", "RNNCell-tanh", "RNNCell-relu"]))
    kw = dict(input_size=draw(st.integers(0, 4)), hidden_size=draw(st.integers(0, 4)), bias=draw(st.booleans()))
    if name.startswith("RNNCell"):
        kw["nonlinearity"] = name.split("-")[1]
    return dict(name=name.split("-")[0], kw=kw, B=draw(st.integers(0, 3)), unbatched=draw(st.booleans()),
                hx=draw(st.booleans()), dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def _run_cell_case(case, backend):
    torch.manual_seed(case["seed"])
    dtype, kw = case["dtype"], case["kw"]
    ref = getattr(torch.nn, case["name"])(**kw, dtype=dtype)
    ours = getattr(fusedrnn, case["name"])(**kw, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    lead = () if case["unbatched"] else (case["B"],)
    args = [torch.randn(*lead, kw["input_size"], dtype=dtype, requires_grad=True)]
    if case["hx"]:
        h = [torch.randn(*lead, kw["hidden_size"], dtype=dtype, requires_grad=True)
             for _ in range(2 if case["name"] == "LSTMCell" else 1)]
        args.append(tuple(h) if case["name"] == "LSTMCell" else h[0])
    with fusedrnn.use_backend(backend):
        compare_calls(ref, ours, tuple(args), list(ref.parameters()), list(ours.parameters()),
                      dtype == torch.float64)


@pytest.fixture
def slow_fuzz_selected(request):
    markexpr = request.config.getoption("markexpr") or ""
    if "slow" not in markexpr or "not slow" in markexpr:
        pytest.skip(f"extended fuzzing ({FUZZ_EXAMPLES_SLOW} new examples): opt in with -m slow")


def _on_every_backend(run, case):
    for backend in BACKENDS:
        in_fresh_thread(run, case, backend)


@CI
@given(layer_cases())
def test_fuzz_layers(case):
    _on_every_backend(_run_layer_case, case)


@CI
@given(cell_cases())
def test_fuzz_cells(case):
    _on_every_backend(_run_cell_case, case)


@pytest.mark.slow
@SLOW
@given(case=layer_cases())
def test_fuzz_layers_slow(slow_fuzz_selected, case):
    _on_every_backend(_run_layer_case, case)


@pytest.mark.slow
@SLOW
@given(case=cell_cases())
def test_fuzz_cells_slow(slow_fuzz_selected, case):
    _on_every_backend(_run_cell_case, case)
