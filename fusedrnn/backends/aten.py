"""Backend "aten": torch's own RNN kernels (cuDNN on a GPU, oneDNN / ATen on a CPU), one layer and direction a call.

It runs each layer call through the `_VF` entry points torch.nn.LSTM / GRU / RNN use (`_VF.lstm`, `_VF.gru`,
`_VF.rnn_tanh`, `_VF.rnn_relu`, with num_layers=1; `_VF.*_cell` for a single step), so a call is what
torch.nn would have computed, with torch's own autograd. It is the yardstick of the measured dispatch: "auto"
takes a fused backend only where the dispatch table measured it faster than this one.

fusedrnn's layer semantics on top of torch's:
  - reverse: torch runs a reverse direction only inside a bidirectional call, so x is flipped in time (each
    sequence within its own length when `lengths` is given), run forward, and flipped back.
  - lengths: packed (enforce_sorted=False) exactly as torch.nn's PackedSequence path; torch cannot pack a
    sequence of length 0, so such calls are refused (the next backend takes them).

Two ways in:
  - `run(call, needs_grad)`: eager calls from fusedrnn.functional; torch's autograd records the _VF op.
  - `forward(call, need_workspace=False)`: inside the fusedrnn::rnn_layer op (torch.compile, export, trace,
    or a named backend under them): inference only. fusedrnn's explicit backward needs its workspace, which
    torch's kernels do not produce, so calls that need one are refused there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .base import Backend, LayerCall, empty_problem_reason

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# torch's kernels, bound once (torch._VF's module __getattr__ is Python, ~1 us a lookup); the eager lane
# (fusedrnn/lane.py) calls the same ones.
LAYER_KERNELS = {"lstm": torch._VF.lstm, "gru": torch._VF.gru, "rnn_tanh": torch._VF.rnn_tanh,
                 "rnn_relu": torch._VF.rnn_relu}
CELL_KERNELS = {"lstm": torch._VF.lstm_cell, "gru": torch._VF.gru_cell, "rnn_tanh": torch._VF.rnn_tanh_cell,
                "rnn_relu": torch._VF.rnn_relu_cell}


def _reverse_within_lengths(seq: Tensor, lengths: Tensor) -> Tensor:
    """seq [T, B, F] with each sequence b's first lengths[b] steps reversed, the padding left in place."""
    T = seq.shape[0]
    steps = torch.arange(T, device=seq.device).unsqueeze(1)  # [T, 1]
    lengths = lengths.to(seq.device).unsqueeze(0)             # [1, B]
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)
    return seq.gather(0, index.unsqueeze(-1).expand_as(seq))


class AtenBackend(Backend):
    name = "aten"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type not in ("cpu", "cuda"):
            return f"runs on CPU and CUDA tensors, got {device.type}"
        return None

    def unsupported_reason(self, call: LayerCall) -> Optional[str]:
        dtypes = _CUDA_DTYPES if call.device.type == "cuda" else _CPU_DTYPES
        if call.dtype not in dtypes:
            return f"dtype {call.dtype} not supported"
        empty = empty_problem_reason(call)
        if empty is not None:
            return empty
        if call.lengths is not None and not torch.compiler.is_compiling() and bool((call.lengths == 0).any()):
            return "a sequence of length 0: torch cannot pack it"
        return None

    # -- eager: torch's autograd -----------------------------------------------------------------------
    def run(self, call: LayerCall, needs_grad: bool):
        """(y [T,B,H_out], h_n [B,H_out], c_n [B,H] or None), differentiable by torch's autograd."""
        cell = call.cell
        if call.seq_len == 1 and call.w_hr is None and call.lengths is None:
            # A single step (the cells, decoding loops): torch's cell kernel, no sequence setup.
            fn = CELL_KERNELS[cell]
            x = call.x.squeeze(0)  # not x[0]: Python indexing costs ~5 us, more than this whole function
            if cell == "lstm":
                h, c = fn(x, (call.h0, call.c0), call.w_ih, call.w_hh, call.b_ih, call.b_hh)
                return h.unsqueeze(0), h, c
            h = fn(x, call.h0, call.w_ih, call.w_hh, call.b_ih, call.b_hh)
            return h.unsqueeze(0), h, None
        has_bias = call.b_ih is not None
        params = [call.w_ih, call.w_hh] + ([call.b_ih, call.b_hh] if has_bias else []) + \
            ([call.w_hr] if call.w_hr is not None else [])
        hx = (call.h0.unsqueeze(0), call.c0.unsqueeze(0)) if cell == "lstm" else call.h0.unsqueeze(0)
        fn = LAYER_KERNELS[cell]
        x, lengths = call.x, call.lengths
        if call.reverse:
            x = x.flip(0) if lengths is None else _reverse_within_lengths(x, lengths)
        if lengths is None:
            out = fn(x, hx, params, has_bias, 1, 0.0, needs_grad, False, False)
            y = out[0]
        else:
            packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
            order = packed.sorted_indices
            hx = (hx[0].index_select(1, order), hx[1].index_select(1, order)) if cell == "lstm" \
                else hx.index_select(1, order)
            out = fn(packed.data, packed.batch_sizes, hx, params, has_bias, 1, 0.0, needs_grad, False)
            y, _ = pad_packed_sequence(
                type(packed)(out[0], packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices),
                total_length=call.seq_len)
            unsort = packed.unsorted_indices
            out = (y, *(s.index_select(1, unsort) for s in out[1:]))
        if call.reverse:
            y = y.flip(0) if lengths is None else _reverse_within_lengths(y, lengths)
        h_n = out[1][0]
        c_n = out[2][0] if cell == "lstm" else None
        return y, h_n, c_n

    # -- inside the fusedrnn op: inference only --------------------------------------------------------
    def forward(self, call: LayerCall, need_workspace: bool):
        if need_workspace:
            raise RuntimeError("backend 'aten' cannot run inside fusedrnn::rnn_layer when gradients are needed "
                               "(torch's kernels keep no fusedrnn workspace); the dispatcher should not have "
                               "chosen it -- please report this")
        with torch.no_grad():
            y, h_n, c_n = self.run(call, needs_grad=False)
        # an op's outputs may not alias each other: h_n can be a view of y (T=1), and two empties must be two
        empty = call.x.new_empty
        return y.contiguous(), h_n.clone(), (c_n.clone() if c_n is not None else empty(0)), empty(0)

    def backward(self, call, y, workspace, grad_y, grad_h_n, grad_c_n):
        raise RuntimeError("backend 'aten' has no fusedrnn backward: its calls differentiate through torch's "
                           "autograd (eager) or are refused where a workspace is needed")
