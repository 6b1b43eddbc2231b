"""The functional door to the kernels: validated, differentiable, torch.compile-friendly.

    y, h_n, c_n = fusedrnn.functional.rnn_layer(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                                 reverse=False, lengths=None)

has exactly the signature and semantics of `fusedrnn.reference.rnn_layer` (see there for shapes), runs on the
backend the dispatcher picks, and differentiates with the backend's explicit BPTT backward.
Under autocast the floating inputs are cast to the autocast dtype, as torch.nn.LSTM does.
"""
from __future__ import annotations

import sys
import warnings
from typing import Optional

import torch
from torch import Tensor
from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters
from torch.autograd import forward_ad

from . import ops, reference
from .reference import CELLS, GATES

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> list:
    return list(t.shape)


def _check_tensors(x: Tensor, specs, same_dtype: bool = True) -> None:
    """Each (name, tensor or None, shape) of `specs`: a Tensor of that shape on x's device (and of x's dtype
    when same_dtype); raises naming the argument, expected vs got."""
    dtype, device = x.dtype, x.device
    for name, t, shape in specs:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if t.shape != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {_shape(t)}")
        if same_dtype and t.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")


def check_layer_args(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths) -> None:
    """Raises a clear error (naming the argument, expected vs got) for any malformed layer call."""
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {list(CELLS)}, got {cell!r}")
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x: expected a 3-D tensor [T, B, I], got "
                         f"{x.dim() if isinstance(x, Tensor) else type(x).__name__}"
                         f"{'-D tensor' if isinstance(x, Tensor) else ''}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x: expected a floating dtype in {[str(d) for d in _FLOAT_DTYPES]}, got {x.dtype}")
    T, B, I = x.shape
    if T == 0:
        raise ValueError("x: expected sequence length T > 0, got 0")
    G = GATES[cell]
    if not isinstance(w_hh, Tensor) or w_hh.dim() != 2 or w_hh.shape[0] % G != 0:
        raise ValueError(f"w_hh: expected [{G}*H, H_out] for {cell}, got "
                         f"{_shape(w_hh) if isinstance(w_hh, Tensor) else type(w_hh).__name__}")
    H = w_hh.shape[0] // G
    if cell != "lstm" and (c0 is not None or w_hr is not None):
        raise ValueError(f"{cell} has no cell state and no projection: c0 and w_hr must be None")
    H_out = w_hr.shape[0] if w_hr is not None else H
    if cell == "lstm" and c0 is None:
        raise ValueError("c0: an LSTM needs an initial cell state [B, H], got None")
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih, b_hh: give both biases or neither")
    # tuples and one pass: this runs on every layer call (a decoding loop calls a cell per token)
    _check_tensors(x, (("w_ih", w_ih, (G * H, I)), ("w_hh", w_hh, (G * H, H_out)), ("h0", h0, (B, H_out)),
                       ("c0", c0, (B, H)), ("b_ih", b_ih, (G * H,)), ("b_hh", b_hh, (G * H,)),
                       ("w_hr", w_hr, (H_out, H))))
    if lengths is not None:
        check_lengths(lengths, T, B, x.device)


def check_lengths(lengths: Tensor, seq_len: int, batch_size: int, device: torch.device) -> None:
    if not isinstance(lengths, Tensor):
        raise TypeError(f"lengths: expected an integer Tensor [B], got {type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths: expected an integer dtype, got {lengths.dtype}")
    if _shape(lengths) != [batch_size]:
        raise ValueError(f"lengths: expected shape [{batch_size}] (one length per sequence), got {_shape(lengths)}")
    if lengths.device != device:
        raise ValueError(f"lengths: expected device {device} (the device of the input), got {lengths.device}")
    if device.type == "meta":  # no values to check
        return
    if torch.compiler.is_compiling():
        torch._assert_async(((lengths >= 0) & (lengths <= seq_len)).all(),
                            "lengths: every length must lie in [0, T]")
        return
    values = _functorch_unwrapped(lengths)  # under vmap .min() is batched and int() cannot read it
    lo, hi = (int(v) for v in torch.aminmax(values))  # one pass (~10 us a call at B=16 instead of two)
    if lo < 0 or hi > seq_len:
        raise ValueError(f"lengths: expected every length in [0, {seq_len}] (the sequence length), "
                         f"got min {lo}, max {hi}")


def _functorch_unwrapped(t: Tensor) -> Tensor:
    """The plain tensor under any vmap / torch.func wrappers (all mapped values, for a value check)."""
    while torch._C._functorch.is_batchedtensor(t) or torch._C._functorch.is_gradtrackingtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _autocast(tensors):
    if not isinstance(tensors[0], Tensor):  # check_layer_args reports it
        return tensors
    device_type = tensors[0].device.type
    # is_autocast_enabled raises for device types without autocast (e.g. meta)
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors]


def spec_only_reason() -> Optional[str]:
    """Why this call must run the PyTorch spec (fusedrnn.reference) instead of a kernel, or None.

    Forward-mode AD (torch.func.jvp / jacfwd / hessian, torch.autograd.forward_ad) and torch.func's
    reverse-mode transforms (grad, vjp, jacrev) cannot go through a fused kernel: a torch.library op has no
    forward-mode rule, and torch's generated autograd for it has no setup_context, which functorch
    requires (torch.func.jvp then silently returned a zero tangent). The spec is plain differentiable
    PyTorch, so every transform and every order of derivative is exact there. vmap alone keeps the
    kernels (the op is batched)."""
    if torch._C._functorch.peek_interpreter_stack() is not None and not torch.compiler.is_compiling():
        kinds = {interpreter.key() for interpreter in retrieve_all_functorch_interpreters()}
        if kinds - {TransformType.Vmap}:
            names = sorted(k.name for k in kinds)
            return f"inside a torch.func transform ({', '.join(names)}): the spec differentiates exactly"
    if forward_ad._current_level >= 0:
        # Every call inside a dual level, dual inputs or not: the op itself refuses to run there, since
        # inside it the tangents are already stripped and cannot be checked (see ops._forward).
        return "forward-mode AD (inside forward_ad.dual_level): the spec carries the tangents"
    return None


def record_spec_decision(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, why: str) -> None:
    from .backends import LayerCall, record_decision
    record_decision("forward", lambda: LayerCall(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                                 reverse).describe(), "reference", [("kernels", why)])


def _in_onnx_export() -> bool:
    """True while torch.onnx.export traces the model (then no backward workspace is recorded)."""
    if torch.compiler.is_dynamo_compiling():
        # torch.compile, or the exporter's strict=True fallback: Dynamo folds is_in_onnx_export to False
        return False
    torch_onnx = sys.modules.get("torch.onnx")  # never imported: not exporting (and no import cost here)
    if torch_onnx is None or not torch_onnx.is_in_onnx_export():
        return False
    if torch.jit.is_tracing():
        raise RuntimeError("fusedrnn modules cannot be exported by the legacy TorchScript ONNX exporter "
                           "(dynamo=False): use fusedrnn.onnx.export(model, args, f) (torch.onnx.export with "
                           "dynamo=True and fusedrnn's translation)")
    if "fusedrnn.onnx" not in sys.modules:
        # A warning, not an error: the exporter would swallow an error and retry with strict=True, then fail
        # later on the untranslated op with a message that does not say where the translation is.
        warnings.warn("torch.onnx.export needs fusedrnn's ONNX translation of fusedrnn::rnn_layer: use "
                      "fusedrnn.onnx.export(model, args, f), or `import fusedrnn.onnx` before calling "
                      "torch.onnx.export(..., dynamo=True)", stacklevel=2)
    return True


def rnn_layer(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None, w_hr: Optional[Tensor] = None,
              reverse: bool = False, lengths: Optional[Tensor] = None):
    """One layer, one direction. Returns (y [T,B,H_out], h_n [B,H_out], c_n [B,H] for LSTM else None)."""
    if torch._C._is_any_autocast_enabled():
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = _autocast([x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr])
    check_layer_args(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
    if lengths is not None:
        lengths = lengths.to(torch.int64)
    if x.numel() == 0 or h0.numel() == 0 or w_hh.numel() == 0:
        # An empty problem (B=0, I=0, H=0 or H_out=0): the spec's loop in PyTorch ops gives the right shapes
        # and gradients (zeros where there is nothing to differentiate); no kernel is launched with a zero
        # size (the CPU kernel divides work by the batch size).
        y, h_n, c_n = reference.rnn_layer(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths)
        return y, h_n, c_n
    why_spec = spec_only_reason()
    if why_spec is not None:
        record_spec_decision(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, why_spec)
        return reference.rnn_layer(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths)
    tracing = torch._C._get_tracing_state() is not None
    # Under torch.jit.trace the flag is baked into the graph: it follows requires_grad alone, so the trace and
    # the tracer's check run (under no_grad) record the same graph, and the traced module stays trainable.
    need_workspace = (torch.is_grad_enabled() or tracing) and (
        x.requires_grad or h0.requires_grad or w_ih.requires_grad or w_hh.requires_grad or
        any(t is not None and t.requires_grad for t in (c0, b_ih, b_hh, w_hr)))
    if (need_workspace or tracing) and _in_onnx_export():
        need_workspace = False  # ONNX has no backward: record the layer without its workspace output
    y, h_n, c_n, _ = ops.run_layer(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                                   need_workspace)
    return y, h_n, (c_n if cell == "lstm" else None)


def check_ext_args(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, zoneout_h,
                   zoneout_c, lengths) -> None:
    """check_layer_args for rnn_layer_ext, plus its norm gains and zoneout masks."""
    if cell not in reference.EXT_CELLS:
        raise ValueError(f"cell: expected one of {list(reference.EXT_CELLS)} (LayerNorm and zoneout cells), "
                         f"got {cell!r}")
    check_layer_args(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, lengths)
    T, B, _ = x.shape
    G, H = GATES[cell], w_hh.shape[0] // GATES[cell]
    if (ln_ih is None) != (ln_hh is None):
        raise ValueError("ln_ih, ln_hh: give both layer-norm gains or neither")
    if cell == "lstm" and (ln_c_weight is None) != (ln_ih is None):
        raise ValueError("ln_c_weight: a LayerNorm LSTM needs ln_ih, ln_hh, ln_c_weight and ln_c_bias together")
    if cell != "lstm" and (ln_c_weight is not None or ln_c_bias is not None or zoneout_c is not None):
        raise ValueError(f"{cell} has no cell state: ln_c_weight, ln_c_bias and zoneout_c must be None")
    if (ln_c_weight is None) != (ln_c_bias is None):
        raise ValueError("ln_c_weight, ln_c_bias: give both or neither")
    _check_tensors(x, (("ln_ih", ln_ih, (G * H,)), ("ln_hh", ln_hh, (G * H,)), ("ln_c_weight", ln_c_weight, (H,)),
                       ("ln_c_bias", ln_c_bias, (H,))))
    _check_tensors(x, (("zoneout_h", zoneout_h, (T, B, H)), ("zoneout_c", zoneout_c, (T, B, H))),
                   same_dtype=False)  # masks of any dtype: nonzero keeps the previous value

def rnn_layer_ext(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                  b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None, ln_ih: Optional[Tensor] = None,
                  ln_hh: Optional[Tensor] = None, ln_c_weight: Optional[Tensor] = None,
                  ln_c_bias: Optional[Tensor] = None, zoneout_h: Optional[Tensor] = None,
                  zoneout_c: Optional[Tensor] = None, reverse: bool = False, lengths: Optional[Tensor] = None):
    """One LayerNorm / zoneout layer, one direction (spec and argument meanings:
    fusedrnn.reference.rnn_layer_ext). zoneout masks may be of any dtype (nonzero: keep the previous value).
    Returns (y [T,B,H], h_n [B,H], c_n [B,H] for LSTM else None)."""
    if torch._C._is_any_autocast_enabled():
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias = _autocast(
            [x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias])
    check_ext_args(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, zoneout_h,
                   zoneout_c, lengths)
    if lengths is not None:
        lengths = lengths.to(torch.int64)
    # the masks as x.dtype 0/1 (the row kernels' contract); they are never differentiated
    zoneout_h, zoneout_c = ((None if m is None else (m != 0).to(x.dtype)) for m in (zoneout_h, zoneout_c))
    params = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias)
    why_spec = None
    if x.numel() == 0 or h0.numel() == 0 or w_hh.numel() == 0:
        why_spec = "empty problem: nothing to compute"
    else:
        why_spec = spec_only_reason()
    if why_spec is not None:
        from .backends import record_decision
        record_decision("forward", lambda: ops.describe_ext_call(cell, x, w_hh, ln_ih, zoneout_h, lengths, reverse),
                        "reference", [("kernels", why_spec)])
        return reference.rnn_layer_ext(cell, *params, zoneout_h, zoneout_c, reverse, lengths)
    tracing = torch._C._get_tracing_state() is not None
    need_workspace = (torch.is_grad_enabled() or tracing) and any(
        t is not None and t.requires_grad for t in params)
    y, h_n, c_n, _ = ops.rnn_layer_ext(cell, *params, zoneout_h, zoneout_c, lengths, reverse, need_workspace)
    return y, h_n, (c_n if cell == "lstm" else None)
