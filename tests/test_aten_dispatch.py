"""Issue #16: backend "aten" (torch's own kernels) against the spec, and the measured dispatch of "auto".

- aten: every cell, both directions, lengths, projection, no bias, T=1 (the cells' path), in float64 against
  fusedrnn.reference (outputs, states and the gradient of every input, state and weight, through torch's
  autograd); inside the op (torch.compile) for inference; refused where fusedrnn's workspace is needed.
- the table: a table file decides; nearest measurement within 2x; a missing, corrupt or foreign table warns
  once and falls back to aten; explain() says which table and ratio decided.
- --tune writes a table that loads and decides.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import fusedrnn
from fusedrnn import functional, reference
from fusedrnn.backends import BACKENDS, BackendUnsupportedError, LayerCall, select_backend
from fusedrnn.backends import table as dispatch_table
from helpers import CELLS, make_layer_args

F64 = torch.float64
CPU = torch.device("cpu")
HAS_CPU = "cpu" in fusedrnn.available_backends("cpu")


@pytest.fixture(autouse=True)
def _fresh_tables(monkeypatch):
    monkeypatch.delenv("FUSEDRNN_DISPATCH_TABLE", raising=False)
    monkeypatch.delenv("FUSEDRNN_BACKEND", raising=False)
    dispatch_table.forget_tables()
    yield
    dispatch_table.forget_tables()


def _grads(out, inputs):
    outs = [o for o in out if o is not None]
    torch.manual_seed(3)
    cot = [torch.randn_like(o) for o in outs]
    return torch.autograd.grad(outs, inputs, cot, allow_unused=True)


ATEN_CASES = [dict(cell=c, reverse=r, lengths=l, T=T, proj=p, bias=b)
              for c in CELLS for r in (False, True) for l, T in ((None, 5), ([5, 2, 3], 5), (None, 1))
              for p, b in ((0, True),)] + \
    [dict(cell="lstm", reverse=True, lengths=[4, 5, 1], T=5, proj=2, bias=False),
     dict(cell="gru", reverse=False, lengths=None, T=3, proj=0, bias=False),
     dict(cell="lstm", reverse=False, lengths=None, T=1, proj=2, bias=True)]


@pytest.mark.parametrize("case", ATEN_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_aten_matches_the_spec_fp64(case):
    args = make_layer_args(case["cell"], T=case["T"], B=3, I=2, H=4, proj=case["proj"], bias=case["bias"],
                           lengths=case["lengths"], reverse=case["reverse"])
    names = [n for n in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr") if args.get(n) is not None]
    inputs = [args[n] for n in names]
    want = reference.rnn_layer(case["cell"], **args)
    with fusedrnn.use_backend("aten"):
        got = functional.rnn_layer(case["cell"], **args)
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert got[0].grad_fn is not None  # torch's autograd recorded the call
    for name, g, w in zip(names, _grads(got, inputs), _grads(want, inputs)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=name)


def test_aten_refuses_zero_lengths_and_auto_moves_on():
    args = make_layer_args("gru", T=4, B=2, I=2, H=3, lengths=[4, 0], requires_grad=False)
    with fusedrnn.use_backend("aten"), pytest.raises(BackendUnsupportedError, match="length 0: torch cannot pack"):
        functional.rnn_layer("gru", **args)
    decision = fusedrnn.explain(lambda: functional.rnn_layer("gru", **args))[0]
    assert decision.chosen != "aten" and ("aten", "a sequence of length 0: torch cannot pack it") in decision.refused


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = fusedrnn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=F64)

    def forward(self, x):
        return self.rnn(x)[0]


def test_aten_inside_the_op_inference_only():
    model, x = _Model(), torch.randn(5, 2, 3, dtype=F64)
    with torch.no_grad():
        want = model(x)
        with fusedrnn.use_backend("aten"):
            got = torch.compile(model, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()
    with fusedrnn.use_backend("aten"), pytest.raises(Exception, match="gradients are needed inside the fusedrnn op"):
        torch.compile(model, backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()
    # auto under compile with gradients: a fused backend that keeps the workspace
    args = make_layer_args("lstm", T=3, B=2, I=2, H=3)
    call = LayerCall("lstm", args["x"], args["h0"], args["c0"], args["w_ih"], args["w_hh"], args["b_ih"],
                     args["b_hh"], None, None, False)
    assert select_backend(call, "forward", need_workspace=True).name != "aten"
    assert select_backend(call, "backward").name != "aten"
    assert select_backend(call, "forward", need_workspace=True, eager=True).name == "aten"  # no table: aten


# ---------------------------------------------------------------------------------------------------------
# The dispatch table
# ---------------------------------------------------------------------------------------------------------
def _table(tmp_path, entries, device_class=None, name="t.json"):
    data = {"format": 1, "device_class": device_class or dispatch_table.device_class(CPU), "meta": {"x": 1},
            "entries": [dict(cell=c, dtype=d, mode=m, H=H, B=B, T=T, ms=ms) for c, d, m, H, B, T, ms in entries]}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _call(cell="lstm", T=16, B=16, H=64, dtype=torch.float32):
    a = make_layer_args(cell, T=T, B=B, I=8, H=H, dtype=dtype, requires_grad=False)
    return LayerCall(cell, a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], None, None, False)


needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="the cpu backend is not built here")


@needs_cpu
def test_table_decides_by_nearest_measurement(tmp_path, monkeypatch):
    path = _table(tmp_path, [("lstm", "float32", "fwd", 64, 16, 16, {"cpu": 1.0, "aten": 2.0}),
                             ("lstm", "float32", "fwd", 64, 64, 16, {"cpu": 3.0, "aten": 2.0}),
                             ("lstm", "float32", "fwdbwd", 64, 16, 16, {"cpu": 5.0, "aten": 4.0})])
    monkeypatch.setenv("FUSEDRNN_DISPATCH_TABLE", str(path))
    assert select_backend(_call(B=16), eager=True).name == "cpu"
    assert select_backend(_call(B=24), eager=True).name == "cpu"     # nearer 16 than 64
    assert select_backend(_call(B=48), eager=True).name == "aten"    # nearer 64
    assert select_backend(_call(B=16), need_workspace=True, eager=True).name == "aten"  # fwdbwd entry
    assert select_backend(_call(B=200), eager=True).name == "aten"   # > 2x from any entry: fallback
    assert select_backend(_call(cell="gru"), eager=True).name == "aten"  # nothing measured for gru
    decision = fusedrnn.explain(lambda: functional.rnn_layer("lstm", **make_layer_args(
        "lstm", T=16, B=16, I=8, H=64, dtype=torch.float32, requires_grad=False)))[0]
    assert decision.chosen == "cpu"
    assert decision.why.startswith("measured 2.00x aten at lstm float32 fwd H=64 B=16 T=16 on cpu-")
    assert "(table t.json)" in decision.why
    far = fusedrnn.explain(lambda: functional.rnn_layer("gru", **make_layer_args(
        "gru", T=2, B=2, I=2, H=2, dtype=torch.float32, requires_grad=False)))[0]
    assert far.chosen == "aten" and far.why == "no measurement near gru float32 fwd H=2 B=2 T=2 in t.json: aten"


@needs_cpu
def test_small_lead_counts_only_at_the_measured_size(tmp_path, monkeypatch):
    path = _table(tmp_path, [("gru", "float32", "fwd", 64, 16, 16, {"cpu": 1.0, "aten": 1.1})])
    monkeypatch.setenv("FUSEDRNN_DISPATCH_TABLE", str(path))
    assert select_backend(_call("gru", B=16), eager=True).name == "cpu"   # measured here: fastest wins
    assert select_backend(_call("gru", B=24), eager=True).name == "aten"  # 1.1x < the inexact margin
    d = fusedrnn.explain(lambda: functional.rnn_layer("gru", **make_layer_args(
        "gru", T=16, B=24, I=8, H=64, dtype=torch.float32, requires_grad=False)))[0]
    assert d.why.startswith("cpu measured only 1.10x aten at gru float32 fwd H=64 B=16 T=16, not this size")


@needs_cpu
def test_longer_sequences_use_the_longest_measurement(tmp_path, monkeypatch):
    path = _table(tmp_path, [("gru", "float32", "fwd", 64, 16, 16, {"cpu": 1.0, "aten": 2.0}),
                             ("gru", "float32", "fwd", 64, 16, 4, {"cpu": 2.0, "aten": 1.0}),
                             ("lstm", "float32", "fwd", 64, 16, 16, {"cpu": 1.0, "aten": 1.1})])
    monkeypatch.setenv("FUSEDRNN_DISPATCH_TABLE", str(path))
    assert select_backend(_call("gru", T=5000), eager=True).name == "cpu"    # as at T=16, the longest
    assert select_backend(_call("gru", T=4), eager=True).name == "aten"      # shorter: the nearest
    assert select_backend(_call("lstm", T=5000), eager=True).name == "aten"  # extrapolated: margin applies
    assert select_backend(_call("lstm", T=16), eager=True).name == "cpu"


def test_no_table_means_aten_and_says_so(monkeypatch):
    monkeypatch.setattr(dispatch_table, "TABLE_DIR", dispatch_table.TABLE_DIR / "nowhere")
    d = fusedrnn.explain(fusedrnn.GRU(2, 3), torch.randn(4, 1, 2))[0]
    assert d.chosen == "aten"
    assert d.why == f"no dispatch table for {dispatch_table.device_class(CPU)}: aten"


@pytest.mark.parametrize("content,problem", [
    (None, "cannot be read"), ("{not json", "not valid JSON"), ('{"format": 2}', 'expected "format": 1'),
    ('{"format": 1, "device_class": "cpu-x", "entries": [{"cell": "lstm"}]}', "entry 0 is malformed"),
    ('{"format": 1, "device_class": "cpu-x", "entries": [{"cell": "lstm", "dtype": "float32", "mode": "fwd", '
     '"H": 0, "B": 1, "T": 1, "ms": {"cpu": 1}}]}', "entry 0 has a non-positive size"),
    ('{"format": 1, "device_class": "cpu-x", "entries": []}', "no entries"),
])
def test_bad_table_warns_once_and_falls_back(tmp_path, monkeypatch, content, problem):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("FUSEDRNN_DISPATCH_TABLE", str(path))
    monkeypatch.setattr(dispatch_table, "TABLE_DIR", dispatch_table.TABLE_DIR / "nowhere")
    m, x = fusedrnn.LSTM(2, 3), torch.randn(3, 1, 2)
    with pytest.warns(RuntimeWarning, match=f"dispatch table {path}: .*{problem}.*FUSEDRNN_DISPATCH_TABLE is ignored"):
        assert fusedrnn.explain(m, x).backends == ["aten"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)  # once: no second warning


def test_table_of_another_device_is_ignored(tmp_path, monkeypatch):
    path = _table(tmp_path, [("lstm", "float32", "fwd", 3, 1, 3, {"cpu": 1.0, "aten": 9.0})],
                  device_class="cpu-imaginary512")
    monkeypatch.setenv("FUSEDRNN_DISPATCH_TABLE", str(path))
    monkeypatch.setattr(dispatch_table, "TABLE_DIR", dispatch_table.TABLE_DIR / "nowhere")
    with pytest.warns(RuntimeWarning, match="measured on cpu-imaginary512, this device is cpu-"):
        assert fusedrnn.explain(fusedrnn.LSTM(2, 3), torch.randn(3, 1, 2)).backends == ["aten"]


@needs_cpu
def test_named_backend_ignores_the_table(tmp_path, monkeypatch):
    path = _table(tmp_path, [("lstm", "float32", "fwd", 64, 16, 16, {"cpu": 9.0, "aten": 1.0})])
    monkeypatch.setenv("FUSEDRNN_DISPATCH_TABLE", str(path))
    with fusedrnn.use_backend("cpu"):
        assert select_backend(_call(), eager=True).name == "cpu"
    assert select_backend(_call(), eager=True).name == "aten"


def test_committed_tables_load():
    files = sorted(dispatch_table.TABLE_DIR.glob("*.json"))
    for f in files:
        t = dispatch_table.load_table(f)
        assert f.name == f"{t.device_class}.json"
        assert all(set(e.ms) >= {"aten"} for e in t.entries), f"{f.name}: every entry measures aten"


# ---------------------------------------------------------------------------------------------------------
# --tune writes a table that loads and decides
# ---------------------------------------------------------------------------------------------------------
@needs_cpu
def test_tune_writes_a_table(tmp_path, monkeypatch):
    from fusedrnn.bench import cli
    out = tmp_path / "tuned"
    status = cli.main(["--tune", "--cell", "gru", "--shape", "2,1,4,4", "--mode", "fwd", "--repeats", "3",
                       "--warmup", "0", "--out", str(out), "--no-plot", "--no-progress"])
    assert status == 0
    path = out / f"dispatch-{dispatch_table.device_class(CPU)}.json"
    table = dispatch_table.load_table(path)
    (entry,) = table.entries
    assert (entry.cell, entry.dtype, entry.mode, entry.H, entry.B, entry.T) == ("gru", "float32", "fwd", 4, 1, 2)
    assert set(entry.ms) == {"torch", "cpu", "aten"}
    monkeypatch.setenv("FUSEDRNN_DISPATCH_TABLE", str(path))
    fastest = min(("cpu", "aten"), key=entry.ms.get)
    assert select_backend(_call("gru", T=2, B=1, H=4), eager=True).name == fastest


# ---------------------------------------------------------------------------------------------------------
# The eager lane: modules sent to aten call torch's kernel as torch.nn does, with the same results
# ---------------------------------------------------------------------------------------------------------
LANE_MODULES = [("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)), ("GRU", dict(batch_first=True)),
                ("RNN", dict(nonlinearity="relu", bias=False)), ("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {})]


@pytest.mark.parametrize("name,kw", LANE_MODULES, ids=[m[0] for m in LANE_MODULES])
def test_lane_matches_the_layer_path_and_torch(name, kw, monkeypatch):
    monkeypatch.setattr(dispatch_table, "TABLE_DIR", dispatch_table.TABLE_DIR / "nowhere")  # auto = aten
    from fusedrnn import nn as fnn
    torch.manual_seed(0)
    ours = getattr(fusedrnn, name)(3, 4, **kw, dtype=F64)
    ref = getattr(torch.nn, name)(3, 4, **kw, dtype=F64)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn((2, 3) if "Cell" in name else (2, 5, 3), dtype=F64, requires_grad=True)
    layer_calls = []
    real = fnn.rnn_layer
    monkeypatch.setattr(fnn, "rnn_layer", lambda *a, **k: layer_calls.append(1) or real(*a, **k))

    def run(m, backend=None):
        x.grad = None
        m.zero_grad()
        if backend is None:
            out = m(x)
        else:
            with fusedrnn.use_backend(backend):
                out = m(x)
        flat = [o for o in (out if isinstance(out, tuple) else (out,)) for o in (o if isinstance(o, tuple) else (o,))]
        sum((o * (i + 1)).sum() for i, o in enumerate(flat)).backward()
        return [o.detach() for o in flat] + [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    lane = run(ours)
    assert layer_calls == []  # the whole call went to torch's kernel
    spec = run(ours, "reference")
    assert layer_calls  # the layer path ran
    for a, b, c in zip(lane, spec, run(ref)):
        torch.testing.assert_close(a, c, rtol=0, atol=0)  # torch's kernel, torch's result: bit for bit
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_cpu
def test_lane_follows_the_table(tmp_path, monkeypatch):
    from fusedrnn import nn as fnn
    layer_calls = []
    real = fnn.rnn_layer
    monkeypatch.setattr(fnn, "rnn_layer", lambda *a, **k: layer_calls.append(1) or real(*a, **k))
    m, x = fusedrnn.GRUCell(8, 64), torch.randn(16, 8)
    with torch.no_grad():
        monkeypatch.setattr(dispatch_table, "TABLE_DIR", dispatch_table.TABLE_DIR / "nowhere")
        m(x)
        assert layer_calls == []
        path = _table(tmp_path, [("gru", "float32", "fwd", 64, 16, 1, {"cpu": 1.0, "aten": 2.0})])
        monkeypatch.setenv("FUSEDRNN_DISPATCH_TABLE", str(path))
        m(x)
        assert layer_calls == [1]  # measured faster: the fused path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            monkeypatch.delenv("FUSEDRNN_DISPATCH_TABLE")
            m(x)  # autocast: no lane, the layer path casts as torch.nn does
        assert layer_calls == [1, 1]
