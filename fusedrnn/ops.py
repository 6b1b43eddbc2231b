"""Every fusedrnn op, registered with torch.library (namespace `fusedrnn`).

    torch.ops.fusedrnn.rnn_layer           one layer, one direction, forward (+ the workspace for backward)
    torch.ops.fusedrnn.rnn_layer_backward  its explicit BPTT backward

Each op has a fake (meta) implementation, so torch.compile(fullgraph=True) traces through it, and
rnn_layer has registered autograd whose backward is rnn_layer_backward. The real implementation asks the
dispatcher (fusedrnn.backends) which backend runs the call. Arguments are not validated here: use
fusedrnn.functional, which checks them with clear messages.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .backends import (BACKENDS, LayerCall, current_backend, record_decision, select_backend, use_backend,
                       workspace_width)
from .backends.reference import ReferenceBackend
from .reference import GATES


def _call(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse) -> LayerCall:
    return LayerCall(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)


def _refuse_forward_ad(op: str) -> None:
    """torch.func.jvp / forward_ad strip the tangents before a torch.library op runs and then report a zero
    tangent: refuse instead of answering wrongly (fusedrnn.functional routes these to the spec)."""
    if forward_ad._current_level >= 0 and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"fusedrnn::{op} has no forward-mode AD rule, and inside torch.func.jvp / jacfwd / "
            f"forward_ad.dual_level its tangent would silently be zero. Call fusedrnn.functional.{op} or the "
            "fusedrnn modules instead: they run the differentiable spec (fusedrnn.reference) there")


@torch.library.custom_op("fusedrnn::rnn_layer", mutates_args=())
def rnn_layer(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor], lengths: Optional[Tensor],
              reverse: bool, need_workspace: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y [T,B,H_out], h_n [B,H_out], c_n [B,H] for LSTM else [0], workspace [T,B,W] or [0])."""
    return _forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, need_workspace)


def _forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, need_workspace):
    _refuse_forward_ad("rnn_layer")
    call = _call(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    return select_backend(call, "forward", need_workspace).forward(call, need_workspace)


@rnn_layer.register_fake
def _rnn_layer_fake(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, need_workspace):
    T, B = x.shape[0], x.shape[1]
    H = w_hh.shape[0] // GATES[cell]
    y = x.new_empty(T, B, h0.shape[-1])
    h_n = x.new_empty(B, h0.shape[-1])
    c_n = x.new_empty(B, H) if cell == "lstm" else x.new_empty(0)
    if need_workspace:
        workspace = x.new_empty(T, B, workspace_width(cell, H, w_hr is not None))
    else:
        workspace = x.new_empty(0)
    return y, h_n, c_n, workspace


@torch.library.custom_op("fusedrnn::rnn_layer_backward", mutates_args=())
def rnn_layer_backward(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                       b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor],
                       lengths: Optional[Tensor], reverse: bool, y: Tensor, workspace: Tensor, grad_y: Tensor,
                       grad_h_n: Tensor, grad_c_n: Optional[Tensor]
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns the gradients of (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr); absent inputs get empty tensors."""
    return _backward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, y, workspace, grad_y,
                     grad_h_n, grad_c_n)


def _backward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, y, workspace, grad_y, grad_h_n,
              grad_c_n):
    call = _call(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    return select_backend(call, "backward").backward(call, y, workspace, grad_y, grad_h_n, grad_c_n)


@rnn_layer_backward.register_fake
def _rnn_layer_backward_fake(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, y, workspace,
                             grad_y, grad_h_n, grad_c_n):
    # Contiguous like every backend's gradients (not empty_like: x may be a transposed batch_first view).
    like = lambda t: x.new_empty(0) if t is None else t.new_empty(t.shape)  # noqa: E731
    return like(x), like(h0), like(c0), like(w_ih), like(w_hh), like(b_ih), like(b_hh), like(w_hr)


def _setup_context(ctx, inputs, output):
    cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, need_workspace = inputs
    y, _, _, workspace = output
    ctx.cell, ctx.reverse, ctx.need_workspace = cell, reverse, need_workspace
    # The backend setting in force at forward time, re-applied around the backward: autograd runs CUDA
    # backwards on its own worker thread, which does not see the caller's use_backend(...) context.
    ctx.backend_setting = current_backend()
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, y, workspace)
    ctx.mark_non_differentiable(workspace)


def _require_workspace(ctx, op: str) -> None:
    """A forward run without its workspace (need_workspace=False) cannot be differentiated: say so."""
    if not ctx.need_workspace:
        raise RuntimeError(
            f"fusedrnn::{op} was called with need_workspace=False, so it cannot be differentiated; "
            f"call it through fusedrnn.functional.{op}, which sets it when gradients are needed")


def _cotangents(cell: str, y: Tensor, h0: Tensor, c0: Optional[Tensor], grad_y, grad_h_n, grad_c_n):
    """The incoming gradients of (y, h_n, c_n), zeros for the outputs nobody used; grad_c_n None unless LSTM."""
    grad_y = torch.zeros_like(y) if grad_y is None else grad_y
    grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n
    if cell != "lstm":
        return grad_y, grad_h_n, None
    return grad_y, grad_h_n, torch.zeros_like(c0) if grad_c_n is None else grad_c_n


def _present(grads, inputs) -> list:
    """Each gradient, or None where its input was absent (the kernels return empty tensors for those)."""
    return [g if t is not None else None for g, t in zip(grads, inputs)]


def _rnn_layer_autograd(ctx, grad_y, grad_h_n, grad_c_n, _grad_workspace):
    _require_workspace(ctx, "rnn_layer")
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, y, workspace = ctx.saved_tensors
    grad_y, grad_h_n, grad_c_n = _cotangents(ctx.cell, y, h0, c0, grad_y, grad_h_n, grad_c_n)
    args = (ctx.cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, ctx.reverse, y, workspace, grad_y,
            grad_h_n, grad_c_n)
    if torch.is_grad_enabled() or torch._C._functorch.peek_interpreter_stack() is not None:
        # create_graph=True (double backward) or a functorch transform (vmap over the backward:
        # is_grads_batched): the fast kernels' gradients are not differentiable, so these come from the
        # differentiable spec path (one recomputation of the forward).
        grads = differentiable_backward(*args[:11], *args[13:])
    else:
        with use_backend(ctx.backend_setting):
            grads = (_backward if plain_eager(args) else rnn_layer_backward)(*args)
    return None, *_present(grads, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)), None, None, None


rnn_layer.register_autograd(_rnn_layer_autograd, setup_context=_setup_context)


def _rnn_layer_vmap(info, in_dims, cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                    need_workspace):
    """vmap of the layer op. Mapped over the data only (x, states, lengths: the usual vmap over examples or
    sequences), the mapped dimension is folded into the batch -- one kernel call on N*B rows; mapped
    weights (model ensembling) run one call per member. (Without this rule functorch's fallback ran one
    call per member in every case, with a performance warning.)"""
    x_d, h0_d, c0_d, w_ih_d, w_hh_d, b_ih_d, b_hh_d, w_hr_d, len_d = in_dims[1:10]
    n = info.batch_size
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
    dims = (x_d, h0_d, c0_d, w_ih_d, w_hh_d, b_ih_d, b_hh_d, w_hr_d, len_d)
    if any(d is not None for d in (w_ih_d, w_hh_d, b_ih_d, b_hh_d, w_hr_d)):
        member = lambda t, d, i: t if d is None else t.select(d, i)  # noqa: E731
        outs = [rnn_layer(cell, *(member(t, d, i) for t, d in zip(tensors, dims)), reverse, need_workspace)
                for i in range(n)]
        return tuple(torch.stack(o) for o in zip(*outs)), (0, 0, 0, 0)
    # mapped dim first: x -> [N, T, B, I] -> [T, N*B, I]; states -> [N*B, H]; lengths -> [N*B]
    front = lambda t, d: t.movedim(d, 0) if d is not None else t.expand(n, *t.shape)  # noqa: E731
    xs = front(x, x_d)
    T, B = xs.shape[1], xs.shape[2]
    x_fold = xs.transpose(0, 1).reshape(T, n * B, xs.shape[3])
    fold_state = lambda t, d: None if t is None else front(t, d).reshape(n * B, t.shape[-1])  # noqa: E731
    lengths_fold = None if lengths is None else front(lengths, len_d).reshape(n * B)
    y, h_n, c_n, workspace = rnn_layer(cell, x_fold, fold_state(h0, h0_d), fold_state(c0, c0_d), w_ih, w_hh,
                                       b_ih, b_hh, w_hr, lengths_fold, reverse, need_workspace)
    y = y.reshape(T, n, B, y.shape[-1])
    h_n = h_n.reshape(n, B, h_n.shape[-1])
    c_n = c_n.reshape(n, B, c_n.shape[-1]) if c_n.numel() else c_n.expand(n, 0)
    workspace = workspace.reshape(T, n, B, workspace.shape[-1]) if workspace.numel() else workspace.expand(n, 0)
    return (y, h_n, c_n, workspace), (1, 0, 0, 1 if workspace.dim() == 4 else 0)


rnn_layer.register_vmap(_rnn_layer_vmap)


_SPEC = ReferenceBackend()


def differentiable_backward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, grad_y, grad_h_n,
                            grad_c_n):
    """The layer's gradients of (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) as a differentiable function of
    the inputs AND of the incoming gradients, so that a backward with create_graph=True gives exact second
    (and higher) derivatives on every backend. The forward is recomputed with the reference backend's
    out-of-place loop (its workspace then carries the graph back to the inputs) and fed to its explicit
    BPTT backward; both are plain PyTorch ops, so this also runs under vmap (is_grads_batched).
    Cost: one more forward than the first-order path, in PyTorch ops."""
    call = _call(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    with torch.enable_grad():
        y, _, _, workspace = _SPEC.forward(call, True)
        return _SPEC.backward(call, y, workspace, grad_y, grad_h_n, grad_c_n)


# ---------------------------------------------------------------------------------------------------------
# Eager fast path. A call through the custom op's Python dispatch costs ~40-60 us (LSTMCell H=64, B=1: the
# CPU kernel takes 21 us, the call through fusedrnn::rnn_layer 84), more than a small step. Plain eager
# calls -- ordinary tensors, no torch.compile, no dispatch or function mode, no functorch transform --
# run the same implementation and the same autograd (setup_context, backward) through an
# autograd.Function instead; everything else goes through the op.
# ---------------------------------------------------------------------------------------------------------
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def plain_eager(args) -> bool:
    """True when `args` can skip the custom op: see the section comment."""
    # torch.jit.trace must see the registered op (a Python autograd.Function cannot be saved by jit.save).
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0 or \
            torch._C._is_torch_function_mode_enabled() or torch._C._functorch.peek_interpreter_stack() is not None \
            or torch._C._get_tracing_state() is not None:
        return False
    # args: (cell, x, ...): one device for all (validated), so x alone says whether it is meta
    if args[1].is_meta:
        return False
    for a in args:
        if type(a) not in _PLAIN_TYPES and isinstance(a, Tensor):
            return False
    return True


class _RnnLayerFunction(torch.autograd.Function):
    # Old-style (forward takes ctx): Function.apply with a separate setup_context goes through functorch's
    # wrapper, which cost more than the custom op it replaces here. `backend`: chosen by run_layer.
    @staticmethod
    def forward(ctx, backend, call, cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, need_workspace):
        inputs = (cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, need_workspace)
        output = backend.forward(call, need_workspace)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_h_n, grad_c_n, grad_workspace):
        return None, None, *_rnn_layer_autograd(ctx, grad_y, grad_h_n, grad_c_n, grad_workspace)


def run_layer(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor], lengths: Optional[Tensor],
              reverse: bool, need_workspace: bool) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """fusedrnn::rnn_layer, through the eager fast path when it applies (fusedrnn.functional calls this).
    Eager calls may run on backend "aten" (torch's kernels and autograd): c_n is then None for GRU / RNN and
    no workspace is returned (None)."""
    args = (cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, need_workspace)
    if not plain_eager(args):
        return rnn_layer(*args)
    call = LayerCall(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    backend = select_backend(call, "forward", need_workspace, eager=True)
    if backend.name == "aten":
        y, h_n, c_n = backend.run(call, need_workspace)
        return y, h_n, c_n, None
    if need_workspace:
        return _RnnLayerFunction.apply(backend, call, *args)
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return rnn_layer(*args)  # its outputs must say they cannot be differentiated
    return backend.forward(call, need_workspace)  # nothing to differentiate: no graph at all


# ---------------------------------------------------------------------------------------------------------
# One layer on a PackedSequence's data, in place (the modules' PackedSequence path on CPU tensors, eager
# only). The cpu kernel reads and writes the packed rows directly (csrc/cpu/rnn_layer.cpp, StepRows): no
# unpack / repack copy per module call, and an ended sequence costs nothing in the steps after its end.
# Around a ~3.5 ms LSTM fwd+bwd (T=10, B=16, H=128) the unpack / repack pair and their backward cost
# ~0.4 ms (12%). Under torch.compile, tracing, functorch transforms, forward AD and autocast the modules
# unpack instead and call rnn_layer with lengths.
# ---------------------------------------------------------------------------------------------------------
def describe_packed_call(cell: str, data: Tensor, batch_sizes: Tensor, w_hh: Tensor, reverse: bool) -> str:
    return (f"{cell} packed rows={data.shape[0]} T={batch_sizes.shape[0]} B={int(batch_sizes[0])} "
            f"I={data.shape[1]} H={w_hh.shape[0] // GATES[cell]} {data.dtype} cpu"
            f"{' reverse' if reverse else ''}")


def _differentiable_packed_backward(cell, data, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                                    grad_y, grad_h_n, grad_c_n):
    """differentiable_backward on the padded (sorted-order) batch, packed back: the create_graph=True path."""
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
    x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
    grad_y_padded, _ = pad_packed_sequence(PackedSequence(grad_y, batch_sizes))
    grads = differentiable_backward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                                    grad_y_padded, grad_h_n, grad_c_n)
    return (pack_padded_sequence(grads[0], lengths).data, *grads[1:])


class _PackedLayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cell, data, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
        call = LayerCall(cell, data, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, None, reverse)
        y, h_n, c_n, workspace = BACKENDS["cpu"].forward(call, True, batch_sizes)
        ctx.cell, ctx.reverse, ctx.batch_sizes = cell, reverse, batch_sizes
        ctx.save_for_backward(data, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, y, workspace)
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, grad_y, grad_h_n, grad_c_n):
        data, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, y, workspace = ctx.saved_tensors
        cell = ctx.cell
        grad_y, grad_h_n, grad_c_n = _cotangents(cell, y, h0, c0, grad_y, grad_h_n, grad_c_n)
        inputs = (data, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
        if torch.is_grad_enabled():  # create_graph=True: the gradients must themselves be differentiable
            grads = _differentiable_packed_backward(cell, data, ctx.batch_sizes, *inputs[1:], ctx.reverse, grad_y,
                                                    grad_h_n, grad_c_n)
        else:
            call = LayerCall(cell, *inputs, None, ctx.reverse)
            grads = BACKENDS["cpu"].backward(call, y, workspace, grad_y, grad_h_n, grad_c_n, ctx.batch_sizes)
        gx, *rest = _present(grads, inputs)
        return None, gx, None, *rest, None


def run_packed_layer(cell: str, data: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor,
                     w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor],
                     reverse: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer, one direction on packed data [rows, I] (batch_sizes: the PackedSequence's) with h0 / c0 in
    its sorted order -> (y [rows, H_out], h_n, c_n or None), on the cpu kernel. The caller (the modules)
    checked the arguments and that the call is plain eager on CPU tensors."""
    record_decision("forward", lambda: describe_packed_call(cell, data, batch_sizes, w_hh, reverse), "cpu", [],
                    "a PackedSequence on CPU: the cpu kernel runs the packed rows in place")
    args = (data, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        y, h_n, c_n = _PackedLayerFunction.apply(cell, data, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                                 reverse)
    else:
        call = LayerCall(cell, *args, None, reverse)
        y, h_n, c_n, _ = BACKENDS["cpu"].forward(call, False, batch_sizes)
    return y, h_n, (c_n if cell == "lstm" else None)


# =====================================================================================================
# rnn_layer_ext (issue #18): LayerNorm LSTM / GRU and zoneout.
#     torch.ops.fusedrnn.rnn_layer_ext           one layer, one direction, forward (+ its workspace)
#     torch.ops.fusedrnn.rnn_layer_ext_backward  its explicit BPTT backward
# Spec: fusedrnn.reference.rnn_layer_ext; driver and row-kernel contract: fusedrnn.backends.ext. The backend
# is chosen like the layer op's: a named one must be able to run the call; "auto" takes the first of
# EXT_PREFERENCE that can (the row kernels have no rival to measure against: torch has no such cell).
# =====================================================================================================
from .backends import BACKEND_NAMES as _BACKEND_NAMES  # noqa: E402
from .backends import available_backends as _available_backends  # noqa: E402
from .backends import ext as _ext  # noqa: E402

EXT_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def describe_ext_call(cell, x, w_hh, ln_ih, zoneout_h, lengths, reverse) -> str:
    H = w_hh.shape[0] // GATES[cell]
    extras = "".join([" layernorm" if ln_ih is not None else "", " zoneout" if zoneout_h is not None else "",
                      " reverse" if reverse else "", " lengths" if lengths is not None else ""])
    return (f"{cell}-ext T={x.shape[0]} B={x.shape[1]} I={x.shape[2]} H={H} "
            f"{str(x.dtype).replace('torch.', '')} {x.device.type}{extras}")


def _ext_refusal(name: str, cell: str, x: Tensor, hidden_size: int) -> Optional[str]:
    try:
        rows = _ext.row_kernels(name)
        if rows is None:
            return "has no LayerNorm / zoneout kernels (torch has no such cell)"
        return rows.unavailable_reason(x.device) or rows.unsupported_reason(cell, x.dtype, hidden_size)
    except ImportError as e:  # a provider module that cannot load (e.g. triton missing)
        return f"cannot be imported ({e})"


def select_ext_rows(cell, x, w_hh, ln_ih, zoneout_h, lengths, reverse, direction: str):
    """The row-kernel provider (backends.ext) that runs this rnn_layer_ext call under the current setting."""
    H = w_hh.shape[0] // GATES[cell]
    describe = lambda: describe_ext_call(cell, x, w_hh, ln_ih, zoneout_h, lengths, reverse)  # noqa: E731
    setting = _current_backend()
    if setting != "auto":
        why = _ext_refusal(setting, cell, x, H)
        if why is not None:
            raise _BackendUnsupportedError(
                f"fusedrnn backend {setting!r} cannot run {describe()} ({direction}): {why}. Use "
                f"fusedrnn.use_backend('auto') to fall back automatically; available on {x.device.type}: "
                f"{[n for n in _available_backends(x.device) if n in _ext.ROW_KERNEL_BACKENDS]}")
        record_decision(direction, describe, setting, [])
        return _ext.row_kernels(setting)
    refused = []
    for name in EXT_PREFERENCE.get(x.device.type, ("reference",)):
        why = _ext_refusal(name, cell, x, H)
        if why is None:
            record_decision(direction, describe, name, refused, "the first in the preference list that can run it")
            return _ext.row_kernels(name)
        refused.append((name, why))
    record_decision(direction, describe, "reference", refused, "no fused row kernel can run it")
    return _ext.ReferenceRows




@torch.library.custom_op("fusedrnn::rnn_layer_ext", mutates_args=())
def rnn_layer_ext(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                  b_ih: Optional[Tensor], b_hh: Optional[Tensor], ln_ih: Optional[Tensor], ln_hh: Optional[Tensor],
                  ln_c_weight: Optional[Tensor], ln_c_bias: Optional[Tensor], zoneout_h: Optional[Tensor],
                  zoneout_c: Optional[Tensor], lengths: Optional[Tensor], reverse: bool, need_workspace: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y [T,B,H], h_n [B,H], c_n [B,H] for LSTM else [0], workspace [T,B,W] or [0])."""
    _refuse_forward_ad("rnn_layer_ext")
    rows = select_ext_rows(cell, x, w_hh, ln_ih, zoneout_h, lengths, reverse, "forward")
    return _ext.ext_forward(rows, cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias,
                            zoneout_h, zoneout_c, lengths, reverse, need_workspace)


@rnn_layer_ext.register_fake
def _rnn_layer_ext_fake(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, zoneout_h,
                        zoneout_c, lengths, reverse, need_workspace):
    T, B = x.shape[0], x.shape[1]
    H = w_hh.shape[0] // GATES[cell]
    workspace = x.new_empty(T, B, _ext.ext_workspace_width(cell, H)) if need_workspace else x.new_empty(0)
    return (x.new_empty(T, B, H), x.new_empty(B, H), x.new_empty(B, H) if cell == "lstm" else x.new_empty(0),
            workspace)


@torch.library.custom_op("fusedrnn::rnn_layer_ext_backward", mutates_args=())
def rnn_layer_ext_backward(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                           b_ih: Optional[Tensor], b_hh: Optional[Tensor], ln_ih: Optional[Tensor],
                           ln_hh: Optional[Tensor], ln_c_weight: Optional[Tensor], ln_c_bias: Optional[Tensor],
                           zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor], lengths: Optional[Tensor],
                           reverse: bool, y: Tensor, workspace: Tensor, grad_y: Tensor, grad_h_n: Tensor,
                           grad_c_n: Optional[Tensor]) -> list[Tensor]:
    """Gradients of (x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias); absent: empty."""
    rows = select_ext_rows(cell, x, w_hh, ln_ih, zoneout_h, lengths, reverse, "backward")
    return list(_ext.ext_backward(rows, cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight,
                                  ln_c_bias, zoneout_h, zoneout_c, lengths, reverse, y, workspace, grad_y,
                                  grad_h_n, grad_c_n))


@rnn_layer_ext_backward.register_fake
def _rnn_layer_ext_backward_fake(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias,
                                 zoneout_h, zoneout_c, lengths, reverse, y, workspace, grad_y, grad_h_n, grad_c_n):
    like = lambda t: x.new_empty(0) if t is None else t.new_empty(t.shape)  # noqa: E731
    return [like(t) for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias)]


_EXT_DIFFERENTIABLE = 11  # x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias


def _ext_setup_context(ctx, inputs, output):
    (cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, zoneout_h, zoneout_c, lengths,
     reverse, need_workspace) = inputs
    y, _, _, workspace = output
    ctx.cell, ctx.reverse, ctx.need_workspace = cell, reverse, need_workspace
    ctx.backend_setting = current_backend()
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, zoneout_h,
                          zoneout_c, lengths, y, workspace)
    ctx.mark_non_differentiable(workspace)


def _rnn_layer_ext_autograd(ctx, grad_y, grad_h_n, grad_c_n, _grad_workspace):
    _require_workspace(ctx, "rnn_layer_ext")
    saved = ctx.saved_tensors
    inputs, (zoneout_h, zoneout_c, lengths, y, workspace) = saved[:_EXT_DIFFERENTIABLE], saved[_EXT_DIFFERENTIABLE:]
    x, h0, c0 = inputs[:3]
    grad_y, grad_h_n, grad_c_n = _cotangents(ctx.cell, y, h0, c0, grad_y, grad_h_n, grad_c_n)
    if torch.is_grad_enabled() or torch._C._functorch.peek_interpreter_stack() is not None:
        # create_graph=True (double backward) or a transform over the backward: the row kernels' gradients
        # are not differentiable; these come from the spec (one recomputation of the forward in PyTorch ops)
        grads = differentiable_ext_backward(ctx.cell, *inputs, zoneout_h, zoneout_c, lengths, ctx.reverse,
                                            grad_y, grad_h_n, grad_c_n)
    else:
        with use_backend(ctx.backend_setting):
            grads = rnn_layer_ext_backward(ctx.cell, *inputs, zoneout_h, zoneout_c, lengths, ctx.reverse, y,
                                           workspace, grad_y, grad_h_n, grad_c_n)
    return None, *_present(grads, inputs), None, None, None, None, None


rnn_layer_ext.register_autograd(_rnn_layer_ext_autograd, setup_context=_ext_setup_context)


def differentiable_ext_backward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias,
                                zoneout_h, zoneout_c, lengths, reverse, grad_y, grad_h_n, grad_c_n):
    """rnn_layer_ext's gradients as a differentiable function of the inputs and the incoming gradients
    (double backward): the spec's forward, differentiated with create_graph=True."""
    from . import reference
    inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias)
    with torch.enable_grad():
        leaves = [None if t is None else (t if t.requires_grad else t.detach().requires_grad_()) for t in inputs]
        y, h_n, c_n = reference.rnn_layer_ext(cell, *leaves, zoneout_h, zoneout_c, reverse, lengths)
        outs, grads_out = [y, h_n], [grad_y, grad_h_n]
        if c_n is not None:
            outs.append(c_n)
            grads_out.append(grad_c_n)
        wrt = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(outs, wrt, grads_out, create_graph=True, allow_unused=True))
    out = []
    for t in leaves:
        g = None if t is None else next(grads)
        out.append(x.new_empty(0) if t is None else (torch.zeros_like(t) if g is None else g))
    return out


# =====================================================================================================
# beam_topk (decoding, issue #6) -- this section up to the end of the file.
#     torch.ops.fusedrnn.beam_topk  log_softmax + beam score + top-k over each item's beams, in one pass
# Spec, tie rule and -inf/NaN policy: fusedrnn/reference_decoding.py. Backends: "reference" (that spec),
# "cpu" (csrc/cpu/beam_topk.cpp), "triton" (fusedrnn/triton/beam_topk.py), "cuda" (csrc/cuda/beam_topk.cu),
# chosen like the layer ops: use_backend(...) / FUSEDRNN_BACKEND names one (it must be able to run the
# call), "auto" takes the first that can in BEAM_TOPK_PREFERENCE. Unlike rnn_layer, arguments are
# validated here (ValueError), in the real and the fake implementation alike.
# =====================================================================================================
import logging as _logging  # noqa: E402

from . import reference_decoding as _rd  # noqa: E402
from ._extension import extension_error as _extension_error  # noqa: E402
from .backends import BackendUnsupportedError as _BackendUnsupportedError  # noqa: E402
from .backends import current_backend as _current_backend  # noqa: E402

BEAM_TOPK_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _compiled_op_missing(name: str) -> Optional[str]:
    if hasattr(torch.ops.fusedrnn, name):
        return None
    return _extension_error() or f"fusedrnn._C was built without {name}; rebuild it: pip install --no-build-isolation -e ."


def beam_topk_refusal(backend: str, logits: Tensor, k: int) -> Optional[str]:
    """Why `backend` cannot run beam_topk on these logits with this k, or None."""
    dev = logits.device.type
    if backend == "reference":
        return None
    if backend == "cpu":
        if dev != "cpu":
            return f"runs on CPU tensors only, got {dev}"
        return _compiled_op_missing("cpu_beam_topk")
    if backend in ("cuda", "triton", "cuda-emu"):
        if logits.dtype not in _KERNEL_DTYPES:
            return f"supports float16/bfloat16/float32 logits, got {logits.dtype}"
        if k > _rd.MAX_KERNEL_K:
            return f"supports k <= {_rd.MAX_KERNEL_K}, got k={k}"
        if backend == "cuda":
            if dev != "cuda":
                return f"runs on CUDA tensors only, got {dev}"
            return _compiled_op_missing("cuda_beam_topk")
        if backend == "cuda-emu":  # the CUDA kernels, emulated on CPU tensors (csrc/emu)
            if dev != "cpu":
                return f"runs on CPU tensors only (the CUDA kernels, emulated), got {dev}"
            from ._extension import emulated_cuda_error, has_emulated_cuda
            return None if has_emulated_cuda() else emulated_cuda_error()
        try:
            from .triton import beam_topk as _triton_beam_topk
        except ImportError as e:
            return f"triton is not importable ({e})"
        return _triton_beam_topk.unavailable_reason(logits.device)
    raise ValueError(f"unknown backend {backend!r}")


def beam_topk_backend(logits: Tensor, k: int) -> str:
    """The backend that runs beam_topk(logits, ..., k) under the current setting (module section doc)."""
    setting = _current_backend()
    if setting != "auto":
        why = beam_topk_refusal(setting, logits, k)
        if why is not None:
            raise _BackendUnsupportedError(
                f"fusedrnn backend {setting!r} cannot run beam_topk on {logits.dtype} {list(logits.shape)} "
                f"{logits.device.type} logits with k={k}: {why}. Use fusedrnn.use_backend('auto') to fall back")
        return setting
    refused = []
    for name in BEAM_TOPK_PREFERENCE.get(logits.device.type, ("reference",)):
        why = beam_topk_refusal(name, logits, k)
        if why is None:
            if refused:
                _logging.getLogger("fusedrnn").debug("beam_topk: %s (skipped %s)", name, refused)
            return name
        refused.append((name, why))
    return "reference"


def _run_beam_topk(backend: str, logits: Tensor, beam_scores: Tensor, k: int, K: int):
    if backend == "reference":
        return _rd.beam_topk_reference(logits, beam_scores, k, K)
    if backend == "cpu":
        return torch.ops.fusedrnn.cpu_beam_topk(logits, beam_scores, k, K)
    if backend == "cuda":
        return torch.ops.fusedrnn.cuda_beam_topk(logits, beam_scores, k, K)
    if backend == "cuda-emu":
        return torch.ops.fusedrnn.cuda_emu_beam_topk(logits, beam_scores, k, K)
    from .triton.beam_topk import beam_topk_triton
    return beam_topk_triton(logits, beam_scores, k, K)


@torch.library.custom_op("fusedrnn::beam_topk", mutates_args=())
def beam_topk(logits: Tensor, beam_scores: Tensor, k: int, num_beams: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """One beam-search step's candidate selection without a [B*K, V] log-prob tensor.

    logits [B*K, V] (fp16/bf16/fp32/fp64; rows b*K..b*K+K-1 are item b's beams), beam_scores [B*K] or
    [B, K] (cumulative log-probs; num_beams=0 takes K from a 2-D beam_scores), 1 <= k <= K*V.
    Returns (scores [B, k] fp32 (fp64 for fp64 logits) = log_softmax(row)[token] + beam score,
    tokens [B, k] int64, parents [B, k] int64 beam index in 0..K-1), best first.
    Ties: larger score, then lower beam, then larger raw logit, then lower token (in practice: lowest
    flattened index beam*V + token). NaN/+inf in a row or its beam score makes all the row's candidates
    NaN, ranked first; all -inf rows and -inf beam scores give -inf candidates. Details:
    fusedrnn.reference_decoding.
    """
    _, K, _ = _rd.check_beam_topk_args(logits, beam_scores, k, num_beams)
    return _run_beam_topk(beam_topk_backend(logits, k), logits, beam_scores, k, K)


@beam_topk.register_fake
def _beam_topk_fake(logits, beam_scores, k, num_beams=0):
    B, _, _ = _rd.check_beam_topk_args(logits, beam_scores, k, num_beams)
    scores = logits.new_empty(B, k, dtype=_rd.score_dtype(logits.dtype))
    return scores, logits.new_empty(B, k, dtype=torch.long), logits.new_empty(B, k, dtype=torch.long)
