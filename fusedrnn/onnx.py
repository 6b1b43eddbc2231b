"""ONNX export of fusedrnn modules (needs the optional packages onnx, onnxscript, onnxruntime to run it).

    import fusedrnn.onnx
    onnx_program = fusedrnn.onnx.export(model.eval(), (x,), "model.onnx")   # torch.onnx.export(dynamo=True)

Every fusedrnn module is a chain of `fusedrnn::rnn_layer` calls (one per layer and direction); torch.export
records them and the translation below turns each into ONNX's own LSTM / GRU / RNN operator, so runtimes
run their fused kernels. Importing this module also registers the translation with the exporter's default
table, so a plain `torch.onnx.export(model, args, dynamo=True)` works after `import fusedrnn.onnx`.

Not exported (clear errors at export): LSTM with proj_size > 0 (ONNX's LSTM has no projection), the legacy
TorchScript exporter (dynamo=False), and PackedSequence input (use `lengths=` on the padded batch instead).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, TypeVar, Union

import torch
from torch.nn.utils.rnn import PackedSequence

try:
    import onnxscript
    from onnxscript import BFLOAT16, DOUBLE, FLOAT, FLOAT16, INT64
    from onnxscript import opset18 as op
except ImportError as e:  # optional dependency: fail on use, with the install command
    raise ImportError("fusedrnn.onnx needs onnx and onnxscript (and onnxruntime to run the result): "
                      "pip install 'fusedrnn[onnx]'") from e

from . import ops  # noqa: F401  (registers torch.ops.fusedrnn.rnn_layer)
from .reference import GATES

__all__ = ["export", "custom_translation_table", "ONNXExportError"]

_log = logging.getLogger("fusedrnn")

TFloat = TypeVar("TFloat", bound=Union[FLOAT16, FLOAT, DOUBLE, BFLOAT16])


class ONNXExportError(RuntimeError):
    """A fusedrnn call that has no ONNX translation (the message says which argument and what to do)."""


PROJ_SIZE_MESSAGE = (
    "fusedrnn.onnx: an LSTM with proj_size > 0 cannot be exported: ONNX's LSTM operator has no projection "
    "(w_hr). Export a model with proj_size=0, or replace the projection with an nn.Linear on the LSTM's "
    "output (that changes the recurrence, so it needs retraining)")

# torch.nn's gate blocks, in the order ONNX wants them (rows of w_ih / w_hh / biases, in units of H).
# LSTM: torch i,f,g,o -> ONNX i,o,f,c.   GRU: torch r,z,n -> ONNX z,r,h.
_ONNX_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn_tanh": (0,), "rnn_relu": (0,)}


def _reorder_gates(cell: str, w, hidden_size: int):
    """w [G*H, ...] in torch's gate order -> [1, G*H, ...] in ONNX's (the leading axis: num_directions).
    One Gather of constant rows: the exporter's constant folding turns it into a reordered initializer."""
    rows = [block * hidden_size + k for block in _ONNX_GATE_ORDER[cell] for k in range(hidden_size)]
    if rows != list(range(len(rows))):
        w = op.Gather(w, op.Constant(value_ints=rows), axis=0)
    return op.Unsqueeze(w, [0])


def _hidden_size(cell: str, w_hh) -> int:
    # ONNX wants H as an attribute (ORT requires it); the weights' shapes are static at export
    rows = w_hh.shape[0]
    if not isinstance(rows, int):
        raise ONNXExportError(f"fusedrnn.onnx: w_hh needs a static shape to export, got {w_hh.shape}")
    return rows // GATES[cell]


def _empty_like_dtype(x):
    # a shape-[0] tensor of x's dtype, like the op's absent c_n / workspace
    return op.CastLike(op.ConstantOfShape(op.Constant(value_ints=[0])), x)


def rnn_layer_to_onnx(cell: str, x: TFloat, h0: TFloat, c0: Optional[TFloat], w_ih: TFloat, w_hh: TFloat,
                      b_ih: Optional[TFloat], b_hh: Optional[TFloat], w_hr: Optional[TFloat],
                      lengths: Optional[INT64], reverse: bool, need_workspace: bool):
    """fusedrnn::rnn_layer as ONNX's LSTM / GRU / RNN (one direction). Same outputs as the op; c_n (non-LSTM)
    and the workspace are shape-[0] tensors (the workspace only feeds a backward, which ONNX has not)."""
    if w_hr is not None:
        raise ONNXExportError(PROJ_SIZE_MESSAGE)
    hidden_size = _hidden_size(cell, w_hh)
    W = _reorder_gates(cell, w_ih, hidden_size)
    R = _reorder_gates(cell, w_hh, hidden_size)
    # B omitted = zeros, by the ONNX spec
    B = None if b_ih is None else op.Concat(_reorder_gates(cell, b_ih, hidden_size),
                                            _reorder_gates(cell, b_hh, hidden_size), axis=1)
    # ONNX's sequence_lens: ORT zeros Y past each length, keeps the state at the last valid step, and runs
    # a reverse direction from each sequence's own last valid step: fusedrnn's lengths= semantics, except
    # for length 0 (below).
    seq_lens = None if lengths is None else op.Cast(lengths, to=onnxscript.ir.DataType.INT32)
    initial_h = op.Unsqueeze(h0, [0])
    direction = "reverse" if reverse else "forward"
    if cell == "lstm":
        Y, Y_h, Y_c = op.LSTM(x, W, R, B, seq_lens, initial_h, op.Unsqueeze(c0, [0]), None,
                              direction=direction, hidden_size=hidden_size)
        c_n = op.Squeeze(Y_c, [0])
    elif cell == "gru":
        Y, Y_h = op.GRU(x, W, R, B, seq_lens, initial_h, direction=direction, hidden_size=hidden_size,
                        linear_before_reset=1)  # torch's reset-after form
        c_n = _empty_like_dtype(x)
    else:
        Y, Y_h = op.RNN(x, W, R, B, seq_lens, initial_h, direction=direction, hidden_size=hidden_size,
                        activations=["Relu" if cell == "rnn_relu" else "Tanh"])
        c_n = _empty_like_dtype(x)
    h_n = op.Squeeze(Y_h, [0])
    if lengths is not None:
        # ORT gives zeros as the final state of a length-0 sequence; fusedrnn (and torch's packed
        # sequences) keep the initial state, as for every step past a sequence's length
        empty = op.Unsqueeze(op.Equal(lengths, op.Constant(value_int=0)), [1])  # [B, 1]
        h_n = op.Where(empty, h0, h_n)
        if cell == "lstm":
            c_n = op.Where(empty, c0, c_n)
    y = op.Squeeze(Y, [1])  # [T, num_directions=1, B, H] -> [T, B, H]
    return y, h_n, c_n, _empty_like_dtype(x)


def custom_translation_table() -> dict:
    """{torch.ops.fusedrnn.rnn_layer.default: its translation}, for torch.onnx.export(...,
    custom_translation_table=...) when calling the exporter directly."""
    return _translation_table()


def _translation_table() -> dict:
    return {torch.ops.fusedrnn.rnn_layer.default: rnn_layer_to_onnx}


def _register_with_default_table() -> None:
    # torch.onnx.export(dynamo=True) builds its table from onnxscript's torch_lib registry at each call, so
    # an entry there makes plain exports work. That registry is onnxscript's, not a promised API: if it is
    # missing, fusedrnn.onnx.export and custom_translation_table() still work.
    try:
        from onnxscript.function_libs.torch_lib.registration import default_registry, torch_op
        registered = torch_op("fusedrnn::rnn_layer", trace_only=True)(rnn_layer_to_onnx)
        try:
            registered.function_ir  # what every export reads from each entry: must not fail for ours
        except Exception:
            getattr(default_registry, "_registry", {}).pop("fusedrnn::rnn_layer", None)  # don't break others
            raise
    except Exception as e:  # noqa: BLE001
        _log.debug("fusedrnn.onnx: not registered with onnxscript's torch_lib registry (%s); use "
                   "fusedrnn.onnx.export or custom_translation_table()", e)


_register_with_default_table()


def _reject_unexportable(model, args, call_kwargs, user_table: dict) -> None:
    """Fails fast, before tracing, on what the translation cannot take (its own errors come after a trace
    and inside the exporter's long report)."""
    inputs = list(args) + list((call_kwargs or {}).values())
    if any(isinstance(a, PackedSequence) for a in inputs):
        raise ONNXExportError(
            "fusedrnn.onnx: a PackedSequence input cannot be exported (torch.export cannot trace unpacking). "
            "Pass the padded batch and its lengths instead: model(padded, lengths=lengths) exports, with the "
            "lengths as an ONNX input (sequence_lens)")
    if torch.ops.fusedrnn.rnn_layer.default in user_table:
        return  # the caller translates the op itself
    for name, module in model.named_modules() if isinstance(model, torch.nn.Module) else ():
        label = f"module {name or type(module).__name__!r}"
        if getattr(module, "layer_norm", False) or hasattr(module, "ln_ih_weight"):
            raise ONNXExportError(
                f"fusedrnn.onnx: {label} is a LayerNorm LSTM / GRU, which ONNX has no operator for (its LSTM and "
                "GRU operators have no normalisation), so it cannot be exported as one operator")
        if module.training and (getattr(module, "zoneout", (0.0, 0.0)) != (0.0, 0.0) or
                                getattr(module, "dropconnect", 0.0)):
            raise ONNXExportError(
                f"fusedrnn.onnx: {label} has zoneout / dropconnect in training mode, which ONNX's RNN operators "
                "cannot express: call model.eval() before exporting (both are off in eval)")
        if getattr(module, "proj_size", 0) and getattr(module, "cell", None) == "lstm":
            raise ONNXExportError(f"{PROJ_SIZE_MESSAGE} (module {name or type(module).__name__!r} has "
                                  f"proj_size={module.proj_size})")


def export(model, args: tuple = (), f=None, *, custom_translation_table: Optional[dict] = None, **kwargs: Any):
    """torch.onnx.export(model, args, f, dynamo=True, **kwargs) with fusedrnn's translation added to
    `custom_translation_table` (the caller's entries win). Returns the ONNXProgram. The model is traced
    under torch.no_grad(), so each layer is recorded without its backward workspace; put it in eval()
    first if it has dropout."""
    _reject_unexportable(model, args, kwargs.get("kwargs"), custom_translation_table or {})
    if kwargs.pop("dynamo", True) is not True:
        raise ONNXExportError(
            "fusedrnn.onnx.export supports only the dynamo exporter (dynamo=True): fusedrnn's layers are a "
            "torch.library custom op, which the legacy TorchScript exporter (dynamo=False) cannot translate")
    table = _translation_table()
    table.update(custom_translation_table or {})
    with torch.no_grad():
        return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)
