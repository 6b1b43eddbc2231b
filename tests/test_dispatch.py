"""Backend registry and dispatch: available_backends, use_backend, FUSEDRNN_BACKEND, refusals with reasons,
'auto' fallback, explain() and the DEBUG log.

Which backends exist besides 'reference' is not assumed: fallback and refusal are tested with fake backends
registered for the duration of a test, and the real ones are tested for whatever this machine offers."""
from __future__ import annotations

import itertools
import json
import logging
import re

import pytest
import torch

import fusedrnn
from fusedrnn import backends
from fusedrnn.backends import BACKENDS, Backend, BackendUnsupportedError, LayerCall
from fusedrnn.backends.reference import ReferenceBackend
from helpers import assert_close_to_reference, make_layer_args

F64 = torch.float64
CPU = torch.device("cpu")


class FakeBackend(Backend):
    """Runs the reference's code, records its calls, and refuses what it is told to refuse."""

    def __init__(self, name, unavailable=None, refuse_lengths=False):
        self.name = name
        self.unavailable = unavailable
        self.refuse_lengths = refuse_lengths
        self.calls = []

    def unavailable_reason(self, device):
        return self.unavailable

    def unsupported_reason(self, call):
        if self.refuse_lengths and call.lengths is not None:
            return f"{self.name} refuses lengths"
        return None

    def forward(self, call, need_workspace):
        self.calls.append("forward")
        return ReferenceBackend().forward(call, need_workspace)

    def backward(self, call, y, workspace, grad_y, grad_h_n, grad_c_n):
        self.calls.append("backward")
        return ReferenceBackend().backward(call, y, workspace, grad_y, grad_h_n, grad_c_n)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("FUSEDRNN_BACKEND", raising=False)


def write_table(path, entries, device_class=None):
    """A dispatch table file for this CPU: entries (cell, dtype, mode, H, B, T, {backend: ms})."""
    data = {"format": 1, "device_class": device_class or backends.dispatch_table.device_class(CPU), "meta": {},
            "entries": [dict(cell=c, dtype=d, mode=m, H=H, B=B, T=T, ms=ms) for c, d, m, H, B, T, ms in entries]}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    """'fake_off' (unavailable) and 'fake' (refuses lengths), first in the CPU preference list, and a
    dispatch table that measured fake fastest, then cpu, then aten (on small_lstm's shapes)."""
    off = FakeBackend("fake_off", unavailable="fake_off is not installed")
    fake = FakeBackend("fake", refuse_lengths=True)
    for b in (off, fake):
        monkeypatch.setitem(BACKENDS, b.name, b)
    monkeypatch.setattr(backends, "BACKEND_NAMES", tuple(BACKENDS))
    monkeypatch.setitem(backends.PREFERENCE, "cpu", ("fake_off", "fake") + backends.PREFERENCE["cpu"])
    times = {"fake": 1.0, "cpu": 2.0, "aten": 3.0, "reference": 9.0}
    table = write_table(tmp_path / "table.json", [("lstm", "float64", mode, 4, 2, 5, times)
                                                  for mode in ("fwd", "fwdbwd")])
    monkeypatch.setenv("FUSEDRNN_DISPATCH_TABLE", str(table))
    return off, fake


# The backend the fakes' table ranks next after fake: cpu where it is built
NEXT = "cpu" if "cpu" in fusedrnn.available_backends("cpu") else "aten"


def small_lstm():
    torch.manual_seed(0)
    return fusedrnn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=F64)


X = torch.randn(5, 2, 3, dtype=F64)


# ---------------------------------------------------------------------------------------------------------
# available_backends
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_available_backends(device):
    dev = torch.device(device)
    names = fusedrnn.available_backends(device)
    assert names == fusedrnn.available_backends(dev) == fusedrnn.available_backends(torch.empty(1, device=device))
    assert "reference" in names
    assert len(set(names)) == len(names)
    for name in backends.BACKEND_NAMES:
        reason = BACKENDS[name].unavailable_reason(dev)
        assert (name in names) == (reason is None), (name, reason)
        if reason is not None:
            assert isinstance(reason, str) and reason
    # the order 'auto' tries them in, then the rest
    preferred = [n for n in backends.PREFERENCE.get(device, backends.DEFAULT_PREFERENCE) if n in names]
    assert names[:len(preferred)] == preferred


def test_available_backends_skips_unavailable_fake(fakes):
    names = fusedrnn.available_backends("cpu")
    assert names[0] == "fake" and "fake_off" not in names
    assert "fake" in fusedrnn.available_backends("meta") and "fake_off" not in fusedrnn.available_backends("meta")


# ---------------------------------------------------------------------------------------------------------
# use_backend and FUSEDRNN_BACKEND
# ---------------------------------------------------------------------------------------------------------
def test_use_backend_nests_and_restores():
    assert fusedrnn.current_backend() == "auto"
    with fusedrnn.use_backend("reference"):
        assert fusedrnn.current_backend() == "reference"
        assert set(fusedrnn.explain(small_lstm(), X).backends) == {"reference"}
        with fusedrnn.use_backend("auto"):
            assert fusedrnn.current_backend() == "auto"
        assert fusedrnn.current_backend() == "reference"
    assert fusedrnn.current_backend() == "auto"


def test_use_backend_restores_on_exception():
    with pytest.raises(KeyError):
        with fusedrnn.use_backend("reference"):
            with fusedrnn.use_backend("auto"):
                raise KeyError("boom")
    assert fusedrnn.current_backend() == "auto"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"use_backend: unknown backend 'nope'; expected 'auto' or one of") as info:
        with fusedrnn.use_backend("nope"):
            pass
    for name in backends.BACKEND_NAMES:
        assert repr(name) in str(info.value)
    assert fusedrnn.current_backend() == "auto"


def test_env_var(monkeypatch):
    monkeypatch.setenv("FUSEDRNN_BACKEND", "reference")
    assert fusedrnn.current_backend() == "reference"
    assert set(fusedrnn.explain(small_lstm(), X).backends) == {"reference"}
    with fusedrnn.use_backend("auto"):  # use_backend wins over the environment
        assert fusedrnn.current_backend() == "auto"
    monkeypatch.setenv("FUSEDRNN_BACKEND", "  ")
    assert fusedrnn.current_backend() == "auto"


def test_env_var_unknown_name(monkeypatch):
    monkeypatch.setenv("FUSEDRNN_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"FUSEDRNN_BACKEND: unknown backend 'nope'; expected 'auto' or one of"):
        small_lstm()(X)


def test_env_var_names_fake(fakes, monkeypatch):
    _, fake = fakes
    monkeypatch.setenv("FUSEDRNN_BACKEND", "fake")
    small_lstm()(X)
    assert fake.calls == ["forward"] * 4


# ---------------------------------------------------------------------------------------------------------
# Refusals: explicit backend -> BackendUnsupportedError; auto -> fallback with reasons
# ---------------------------------------------------------------------------------------------------------
def test_explicit_backend_refusing_the_call_raises(fakes):
    assert issubclass(BackendUnsupportedError, RuntimeError)
    m = small_lstm()
    with fusedrnn.use_backend("fake"):
        with pytest.raises(BackendUnsupportedError,
                           match=r"fusedrnn backend 'fake' cannot run lstm T=5 B=2 I=3 H=4 float64 cpu lengths bias "
                                 r"\(forward\): fake refuses lengths\. Use fusedrnn\.use_backend\('auto'\)"):
            m(X, lengths=[5, 2])
    with fusedrnn.use_backend("fake_off"):
        with pytest.raises(BackendUnsupportedError, match=r"fusedrnn backend 'fake_off' cannot run .*: "
                                                          r"fake_off is not installed\..* available on cpu: \['fake', "):
            m(X)


UNAVAILABLE_ON_CPU = [n for n in backends.BACKEND_NAMES if BACKENDS[n].unavailable_reason(CPU) is not None]


@pytest.mark.parametrize("name", UNAVAILABLE_ON_CPU)
def test_explicit_unavailable_real_backend_raises_with_its_reason(name):
    reason = BACKENDS[name].unavailable_reason(CPU)
    with fusedrnn.use_backend(name):
        with pytest.raises(BackendUnsupportedError, match=rf"fusedrnn backend '{name}' cannot run lstm .*"
                                                          rf"{re.escape(reason)}"):
            small_lstm()(X)


def test_explicit_backend_runs_forward_and_backward(fakes):
    _, fake = fakes
    m = small_lstm()
    x = X.clone().requires_grad_()
    with fusedrnn.use_backend("fake"):
        y, (h, c) = m(x)
        (y.sum() + h.sum() + c.sum()).backward()
    assert fake.calls == ["forward"] * 4 + ["backward"] * 4
    m2 = small_lstm()
    x2 = X.clone().requires_grad_()
    with fusedrnn.use_backend("reference"):
        y2, (h2, c2) = m2(x2)
        (y2.sum() + h2.sum() + c2.sum()).backward()
    assert_close_to_reference("y", y, y2)
    assert_close_to_reference("grad x", x.grad, x2.grad)


def test_auto_falls_back_and_explain_reports_why(fakes):
    off, fake = fakes
    m = small_lstm()
    plain = fusedrnn.explain(m, X)
    assert plain.backends == ["fake"] * 4
    for d in plain:
        assert d.direction == "forward"
        assert d.refused == [("fake_off", "fake_off is not installed")]
    with_lengths = fusedrnn.explain(m, X, lengths=[5, 2])
    assert with_lengths.backends == [NEXT] * 4  # the next fastest measured
    for d in with_lengths:
        assert d.refused[:2] == [("fake_off", "fake_off is not installed"), ("fake", "fake refuses lengths")]
    text = str(with_lengths)
    assert "forward lstm T=5 B=2 I=3 H=4 float64 cpu lengths bias: " in text
    assert "forward lstm T=5 B=2 I=3 H=4 float64 cpu reverse lengths bias: " in text
    assert "    skipped fake_off: fake_off is not installed" in text
    assert "    skipped fake: fake refuses lengths" in text
    assert fake.calls == ["forward"] * 4  # only the plain run used it; explain ran without autograd


def test_explain_any_callable_and_nothing():
    expl = fusedrnn.explain(lambda x: fusedrnn.GRU(3, 2, dtype=F64)(x), X)
    assert len(expl) == 1 and expl[0].chosen in fusedrnn.available_backends("cpu")
    assert expl[0].call == "gru T=5 B=2 I=3 H=2 float64 cpu bias"
    assert str(fusedrnn.explain(lambda: None)) == "(no fusedrnn layer op ran)"


def test_backward_is_dispatched_too(fakes):
    m = small_lstm()
    x = X.clone().requires_grad_()
    with backends.recording_decisions() as decisions:
        y, _ = m(x, lengths=[5, 3])
        y.sum().backward()
    directions = [d.direction for d in decisions]
    assert directions == ["forward"] * 4 + ["backward"] * 4
    for d in decisions:
        assert ("fake", "fake refuses lengths") in d.refused


def test_debug_log(fakes, caplog):
    m = small_lstm()
    with caplog.at_level(logging.WARNING, logger="fusedrnn"):
        m(X)
    assert not [r for r in caplog.records if r.name == "fusedrnn"]
    with caplog.at_level(logging.DEBUG, logger="fusedrnn"):
        m(X, lengths=[4, 2])
    records = [r for r in caplog.records if r.name == "fusedrnn"]
    assert len(records) == 4 and all(r.levelno == logging.DEBUG for r in records)
    chosen = NEXT
    assert records[0].getMessage().startswith(f"forward lstm T=5 B=2 I=3 H=4 float64 cpu lengths bias: {chosen} -- "
                                              "variable lengths: torch's kernels would need a PackedSequence")
    assert "skipped fake_off: fake_off is not installed" in records[0].getMessage()
    assert "skipped fake: fake refuses lengths" in records[0].getMessage()


# ---------------------------------------------------------------------------------------------------------
# Whatever is available here: each backend runs when named, and any backward consumes any forward
# ---------------------------------------------------------------------------------------------------------
AVAILABLE_ON_CPU = fusedrnn.available_backends("cpu")
PAIRS = list(itertools.product(AVAILABLE_ON_CPU, repeat=2))
T, B, I, H = 4, 3, 3, 4
LENGTHS = [4, 1, 3]


def _module(cell, dtype):
    torch.manual_seed(0)
    if cell == "lstm-P2":
        return fusedrnn.LSTM(I, H, proj_size=2, bidirectional=True, dtype=dtype)
    if cell == "gru":
        return fusedrnn.GRU(I, H, bidirectional=True, dtype=dtype)
    return fusedrnn.RNN(I, H, bidirectional=True, dtype=dtype)


def _dtype_for(names, cell):
    """fp64 if every named backend takes this module's layer calls in fp64, else fp32, else skip."""
    op_cell = cell.split("-")[0]
    for dtype in (F64, torch.float32):
        a = make_layer_args(op_cell, T, B, I, H, proj=2 if cell == "lstm-P2" else 0, dtype=dtype,
                            lengths=LENGTHS, requires_grad=False)
        calls = [LayerCall(op_cell, a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"],
                           a["lengths"], reverse) for reverse in (False, True)]
        reasons = {n: backends.refusal(BACKENDS[n], c) for n in names for c in calls}
        if all(r is None for r in reasons.values()):
            return dtype
    pytest.skip(f"no common dtype: {reasons}")


def _forward_backward(m, fwd, bwd):
    dtype = next(m.parameters()).dtype
    x = torch.randn(T, B, I, dtype=F64, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    with fusedrnn.use_backend(fwd):
        y, state = m(x, lengths=torch.tensor(LENGTHS))
    outs = [y] + (list(state) if isinstance(state, tuple) else [state])
    g = torch.Generator().manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=F64)).sum() for o in outs)
    with fusedrnn.use_backend(bwd):
        grads = torch.autograd.grad(loss, [x] + list(m.parameters()))
    return outs, grads


@pytest.mark.parametrize("fwd,bwd", PAIRS, ids=[f"{a}-then-{b}" for a, b in PAIRS])
@pytest.mark.parametrize("cell", ["lstm-P2", "gru", "rnn_tanh"])
def test_any_backward_consumes_any_forward(cell, fwd, bwd):
    """Forward on one backend, backward on another (the workspace layout is shared), against the reference in
    fp64; in fp32 (within helpers' fp32 bound) where one of them does not take fp64."""
    dtype = _dtype_for({fwd, bwd}, cell)
    m = _module(cell, dtype)
    with fusedrnn.use_backend(fwd):
        assert set(fusedrnn.explain(m, torch.zeros(T, B, I, dtype=dtype), lengths=LENGTHS).backends) == {fwd}
    outs, grads = _forward_backward(m, fwd, bwd)
    ref = _module(cell, F64)
    ref.load_state_dict(m.state_dict())
    ref_outs, ref_grads = _forward_backward(ref, "reference", "reference")
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == dtype
        assert_close_to_reference(f"output {i}", o, r)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for n, g, r in zip(names, grads, ref_grads):
        assert_close_to_reference(f"grad {n}", g, r)
