"""The eager lane: module calls that "auto" (or "aten") sends to torch's own kernels, at torch.nn's per-call cost.

At tiny sizes a call costs what its Python costs: torch.nn.LSTMCell at H=64, B=1 is ~25 us of which the
kernel is a third. Going through fusedrnn.functional (validation, the dispatcher, the backend object) added
~70 us on this project's 2-core EPYC (bench/bench_overhead.py) -- a decoding loop pays it per token. So a
module asks here first: the dispatch decision is cached per (cell, shapes, dtype, device, grad needed,
backend setting, dispatch table), and when it is "aten" the module calls the `_VF` kernel exactly as
torch.nn does, which validates shapes in C++ as torch.nn relies on. Anything else (a fused backend, a
transform, tracing, compile, autocast, explain() recording, a debug log) returns None and takes the full
path through fusedrnn.functional, which validates and dispatches per call as before.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import backends
from .backends import LayerCall, select_backend
from .backends import table as dispatch_table
from .backends.aten import CELL_KERNELS, LAYER_KERNELS

_LSTM_CELL = CELL_KERNELS["lstm"]
_logger = logging.getLogger("fusedrnn")

# os.environ.get encodes the key and decodes the value (~1.5 us twice a call here); the posix mapping's
# underlying dict is what os.environ itself reads and writes.
if os.name == "posix" and isinstance(getattr(os.environ, "_data", None), dict):
    _ENV_DATA = os.environ._data
    _BACKEND_KEY, _TABLE_KEY = b"FUSEDRNN_BACKEND", dispatch_table.TABLE_ENV.encode()

    def _env_state():
        return _ENV_DATA.get(_BACKEND_KEY), _ENV_DATA.get(_TABLE_KEY)
else:  # pragma: no cover
    def _env_state():
        return os.environ.get("FUSEDRNN_BACKEND"), os.environ.get(dispatch_table.TABLE_ENV)

_decisions: dict = {}


def lane_open() -> bool:
    """True in plain eager mode, where the lane may run (see the module doc)."""
    return not (torch._C._is_any_autocast_enabled() or torch._C._get_tracing_state() is not None
                or torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0
                or torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled()
                or torch.compiler.is_compiling() or backends._recorder.get() is not None
                or _logger.isEnabledFor(logging.DEBUG))


def _decide(key, calls, need_grad: bool) -> bool:
    """On a cache miss (the callers look `key` up first): whether every call in `calls()` (LayerCalls, built
    only here) goes to aten; remembered under `key`."""
    try:
        hit = all(select_backend(c, "forward", need_grad, eager=True).name == "aten" for c in calls())
    except backends.BackendUnsupportedError:
        hit = False  # e.g. a named backend and an empty problem: the full path knows what to do
    if len(_decisions) > 4096:
        _decisions.clear()
    _decisions[key] = hit
    return hit


def cell_step(cell: str, x: Tensor, h: Tensor, c: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor], b_hh: Optional[Tensor]):
    """(h1, c1 or None) from torch's cell kernel when the dispatch sends this step there, else None.
    x [B, I], h (and c) [B, H] plain tensors, already checked by the module against its own sizes (the
    weights' shapes are torch's kernel's to check, as in torch.nn: not part of the key)."""
    # lane_open() inlined (keep the condition in step with it): a Python call costs ~1 us here, and this runs
    # once per token
    if torch._C._is_any_autocast_enabled() or torch._C._get_tracing_state() is not None \
            or torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0 \
            or torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled() \
            or torch.compiler.is_compiling() or backends._recorder.get() is not None \
            or _logger.isEnabledFor(logging.DEBUG):
        return None
    # Which table row (fwd or fwdbwd) to read; torch's autograd records whatever requires grad either way,
    # and a fused choice leaves the lane for the full path, which derives need_workspace from every input.
    need_grad = torch.is_grad_enabled() and (w_ih.requires_grad or x.requires_grad or h.requires_grad)
    key = (cell, x.size(0), x.size(1), h.size(1), b_ih is None, x.dtype, x.get_device(), need_grad,
           backends._override.get(), _env_state())
    hit = _decisions.get(key)
    if hit is None:
        hit = _decide(key, lambda: [LayerCall(cell, x.unsqueeze(0), h, c, w_ih, w_hh, b_ih, b_hh, None, None,
                                              False)], need_grad)
    if not hit:
        return None
    if c is not None:
        return _LSTM_CELL(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    return CELL_KERNELS[cell](x, h, w_ih, w_hh, b_ih, b_hh), None


def module_call(module, x: Tensor, h0: Tensor, c0: Optional[Tensor]):
    """(y, h_n, c_n or None) from one torch `_VF` call of the whole module when every layer's call would go
    to aten, else None. x [T, B, I] time-major, h0/c0 [L*D, B, *] checked by the module."""
    if not lane_open():
        return None
    weights = module._flat_weights
    need_grad = False
    if torch.is_grad_enabled():
        need_grad = x.requires_grad or h0.requires_grad or (c0 is not None and c0.requires_grad)
        for w in weights:
            need_grad = need_grad or w.requires_grad
    # the module's configuration is fixed at construction; the weights' shapes are torch's kernel's to check
    key = (module.cell, module.num_layers, module.bidirectional, module.proj_size, module.hidden_size, x.size(0),
           x.size(1), x.size(2), x.dtype, x.get_device(), need_grad, backends._override.get(), _env_state())

    def calls():
        directions = 2 if module.bidirectional else 1
        out = []
        layer_input = x
        for layer in range(module.num_layers):
            for d in range(directions):
                k = layer * directions + d
                w = module._layer_weights(layer, d)
                out.append(LayerCall(module.cell, layer_input, h0[k], None if c0 is None else c0[k], *w, None,
                                     d == 1))
            width = (module.proj_size or module.hidden_size) * directions
            layer_input = x.new_empty(x.shape[0], x.shape[1], width)
        return out

    hit = _decisions.get(key)
    if hit is None:
        hit = _decide(key, calls, need_grad)
    if not hit:
        return None
    hx = (h0, c0) if module.cell == "lstm" else h0
    out = LAYER_KERNELS[module.cell](x, hx, weights, module.bias, module.num_layers, module.dropout,
                                      module.training, module.bidirectional, False)
    return out[0], out[1], (out[2] if module.cell == "lstm" else None)


def forget() -> None:
    """Drop the cached decisions (tests; the cache also keys on everything a decision depends on)."""
    _decisions.clear()
