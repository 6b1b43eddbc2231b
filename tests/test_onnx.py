"""ONNX export (fusedrnn.onnx): every module kind exported with the dynamo exporter, run in onnxruntime on
the CPU, and compared with fusedrnn's eager outputs; and the clear errors for what does not export."""
import sys
import warnings

import pytest
import torch
from torch.export import Dim
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._pytree import tree_leaves

pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install 'fusedrnn[onnx]'")
pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript: pip install 'fusedrnn[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="running the export needs onnxruntime: pip install 'fusedrnn[onnx]'")

import fusedrnn  # noqa: E402
import fusedrnn.onnx  # noqa: E402

FP32_EPS = torch.finfo(torch.float32).eps
I, H = 3, 4
MODULES = {"lstm": (fusedrnn.LSTM, {}), "gru": (fusedrnn.GRU, {}),
           "rnn_tanh": (fusedrnn.RNN, {"nonlinearity": "tanh"}), "rnn_relu": (fusedrnn.RNN, {"nonlinearity": "relu"})}
ONNX_OP = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}


def fp32_tolerance(steps: int, fan_in: int, layers: int = 1) -> float:
    """Allowed |ORT - fusedrnn| relative to max(1, |output|): two fp32 implementations that sum each
    pre-activation (fan_in terms) in different orders differ by up to ~fan_in * eps per step, and the
    difference can accumulate over the steps and the stacked layers."""
    return FP32_EPS * fan_in * steps * layers


def run_in_onnxruntime(onnx_program, args, kwargs=None):
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    inputs = [t.numpy() for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(inputs), f"ONNX inputs {names} vs {len(inputs)} tensors given"
    return [torch.from_numpy(o) for o in session.run(None, dict(zip(names, inputs)))]


def assert_matches_eager(model, args, onnx_outputs, tol, kwargs=None):
    with torch.no_grad():
        expected = [t for t in tree_leaves(model(*args, **(kwargs or {}))) if isinstance(t, torch.Tensor)]
    assert len(onnx_outputs) == len(expected)
    for k, (got, want) in enumerate(zip(onnx_outputs, expected)):
        assert got.shape == want.shape, f"output {k}: shape {list(got.shape)} != eager {list(want.shape)}"
        scale = max(1.0, want.abs().max().item())
        err = (got.double() - want.double()).abs().max().item()
        assert err <= tol * scale, f"output {k}: max |ORT - eager| = {err:.3g} > {tol * scale:.3g}"


def op_types(onnx_program):
    return [(n.domain, n.op_type) for n in onnx_program.model_proto.graph.node]


@pytest.mark.parametrize("cell", list(MODULES))
def test_two_layer_bidirectional_with_hx_and_lengths(cell):
    torch.manual_seed(0)
    cls, kw = MODULES[cell]
    model = cls(I, H, num_layers=2, bidirectional=True, **kw).eval()
    T, B = 6, 4
    x = torch.randn(T, B, I)
    h0 = torch.randn(4, B, H)
    hx = (h0, torch.randn(4, B, H)) if cell == "lstm" else h0
    # full length, partial, empty, and a single step: the reverse direction starts at each sequence's end
    lengths = torch.tensor([T, 3, 0, 1])
    program = fusedrnn.onnx.export(model, (x, hx), kwargs={"lengths": lengths})
    ops = op_types(program)
    assert ops.count(("", ONNX_OP[cell])) == 4, ops  # one ONNX RNN op per layer and direction
    assert all(domain == "" for domain, _ in ops), ops  # nothing left for a runtime to lack
    outputs = run_in_onnxruntime(program, (x, hx), {"lengths": lengths})
    assert_matches_eager(model, (x, hx), outputs, fp32_tolerance(T, 2 * H + H, layers=2), {"lengths": lengths})
    # the semantics the translation relies on, checked on ORT's own output: zeros past each length
    assert outputs[0][3:, 1].abs().max() == 0 and outputs[0][:, 2].abs().max() == 0


def test_one_layer_batch_first_without_bias():
    torch.manual_seed(1)
    model = fusedrnn.LSTM(I, H, batch_first=True, bias=False).eval()  # (RNNCell below: bias=False too)
    x = torch.randn(2, 5, I)
    program = fusedrnn.onnx.export(model, (x,))
    assert_matches_eager(model, (x,), run_in_onnxruntime(program, (x,)), fp32_tolerance(5, I + H))


@pytest.mark.parametrize("make_cell, with_hx", [
    (lambda: fusedrnn.LSTMCell(I, H), True),
    (lambda: fusedrnn.GRUCell(I, H), False),
    (lambda: fusedrnn.RNNCell(I, H, bias=False, nonlinearity="relu"), True),
], ids=["LSTMCell", "GRUCell", "RNNCell-relu"])
def test_cells(make_cell, with_hx):
    torch.manual_seed(2)
    cell = make_cell().eval()
    x, h = torch.randn(3, I), torch.randn(3, H)
    args = (x,) if not with_hx else (x, (h, torch.randn(3, H)) if isinstance(cell, fusedrnn.LSTMCell) else h)
    program = fusedrnn.onnx.export(cell, args)
    assert_matches_eager(cell, args, run_in_onnxruntime(program, args), fp32_tolerance(1, I + H))


def test_dynamic_batch_and_time():
    torch.manual_seed(3)
    model = fusedrnn.LSTM(I, H, bidirectional=True, batch_first=True).eval()
    x, lengths = torch.randn(3, 5, I), torch.tensor([5, 2, 1])
    batch, time = Dim("batch", min=2, max=64), Dim("time", min=2, max=64)
    program = fusedrnn.onnx.export(model, (x,), kwargs={"lengths": lengths},
                                   dynamic_shapes={"input": {0: batch, 1: time}, "lengths": {0: batch}})
    x2, lengths2 = torch.randn(4, 9, I), torch.tensor([9, 4, 1, 0])  # other B and T than the traced ones
    outputs = run_in_onnxruntime(program, (x2,), {"lengths": lengths2})
    assert outputs[0].shape == (4, 9, 2 * H)
    assert_matches_eager(model, (x2,), outputs, fp32_tolerance(9, I + H), {"lengths": lengths2})


def test_plain_torch_onnx_export_after_import():
    torch.manual_seed(4)
    model = fusedrnn.GRU(I, H).eval()
    x = torch.randn(5, 2, I)
    # gradients enabled (the default): the export must still record the layer without its workspace
    program = torch.onnx.export(model, (x,), dynamo=True)
    layer_calls = [n for n in program.exported_program.graph.nodes
                   if n.target is torch.ops.fusedrnn.rnn_layer.default]
    assert [n.args[-1] for n in layer_calls] == [False]  # need_workspace
    assert ("", "GRU") in op_types(program)
    assert_matches_eager(model, (x,), run_in_onnxruntime(program, (x,)), fp32_tolerance(5, I + H))


def test_export_without_fusedrnn_onnx_points_to_it(monkeypatch):
    # What a trace under torch.onnx.export sees when fusedrnn.onnx was never imported (a real export would
    # find the translation registered by this file's import, so the exporter's flag is set by hand)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    monkeypatch.delitem(sys.modules, "fusedrnn.onnx")
    # A real export runs under Dynamo, where modules never take the eager lane to torch's kernels; without
    # Dynamo here, a named backend keeps the call on fusedrnn's layer path as under the exporter.
    monkeypatch.setenv("FUSEDRNN_BACKEND", "reference")
    with pytest.warns(UserWarning, match=r"fusedrnn\.onnx\.export"):
        fusedrnn.GRU(I, H)(torch.randn(2, 1, I))


def test_proj_size_raises_before_tracing():
    model = fusedrnn.LSTM(I, H, proj_size=2).eval()
    with pytest.raises(fusedrnn.onnx.ONNXExportError, match="proj_size=2"):
        fusedrnn.onnx.export(model, (torch.randn(5, 2, I),))


def test_proj_size_raises_in_the_translation():
    # plain torch.onnx.export gets no pre-check: the translation itself refuses the projection
    model = fusedrnn.LSTM(I, H, proj_size=2).eval()
    with torch.no_grad(), pytest.raises(Exception, match="proj_size > 0 cannot be exported"):
        torch.onnx.export(model, (torch.randn(5, 2, I),), dynamo=True)


def test_packed_sequence_raises():
    model = fusedrnn.GRU(I, H).eval()
    packed = pack_padded_sequence(torch.randn(5, 2, I), torch.tensor([5, 3]))
    with pytest.raises(fusedrnn.onnx.ONNXExportError, match="PackedSequence.*lengths"):
        fusedrnn.onnx.export(model, (packed,))


def test_legacy_exporter_rejected(tmp_path):
    model = fusedrnn.RNN(I, H).eval()
    x = torch.randn(5, 2, I)
    with pytest.raises(fusedrnn.onnx.ONNXExportError, match="dynamo=True"):
        fusedrnn.onnx.export(model, (x,), dynamo=False)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match=r"legacy.*fusedrnn\.onnx\.export"):
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False)


def test_custom_translation_table():
    table = fusedrnn.onnx.custom_translation_table()
    assert set(table) == {torch.ops.fusedrnn.rnn_layer.default}
