"""What every backend shares: the description of one layer call, the workspace layout, the Backend base.

The workspace is the one tensor a forward leaves for its backward. Its layout is the same for every
backend, so any backend's backward can consume any backend's forward (the dispatcher may pick a different
backend for the backward, e.g. when `use_backend` was left in between), and tests can mix them.

    workspace [T, B, W] in x.dtype, row t written at every valid step t (rows of invalid steps are unused):
      lstm      W = 5H (+H with projection): sigmoid(i), sigmoid(f), tanh(g), sigmoid(o), c_t
                [, r_t = o * tanh(c_t), the unprojected output]
      gru       W = 4H: sigmoid(r), sigmoid(z), tanh(n), W_hn h_{t-1} + b_hn
      rnn_*     W = 0: y itself holds h_t, and tanh' = 1 - h^2, relu' = [h > 0]

On a PackedSequence's data (the cpu kernel's packed layout, fusedrnn.ops.run_packed_layer) x, y, the workspace
and their gradients are packed the same way, [rows, *], with step t's rows at their packed positions.

The previous state of step t is read back from y: y[t-1] (or y[t+1] reversed) while that step is valid,
else h0 -- see `previous_states`.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import torch
from torch import Tensor

from ..reference import GATES


def workspace_width(cell: str, hidden_size: int, has_projection: bool) -> int:
    if cell == "lstm":
        return (6 if has_projection else 5) * hidden_size
    if cell == "gru":
        return 4 * hidden_size
    return 0


@dataclass
class LayerCall:
    """One layer, one direction: the arguments of `fusedrnn.reference.rnn_layer` plus the cell name."""

    cell: str
    x: Tensor
    h0: Tensor
    c0: Optional[Tensor]
    w_ih: Tensor
    w_hh: Tensor
    b_ih: Optional[Tensor]
    b_hh: Optional[Tensor]
    w_hr: Optional[Tensor]
    lengths: Optional[Tensor]
    reverse: bool

    @property
    def seq_len(self) -> int:
        return self.x.shape[0]

    @property
    def batch_size(self) -> int:
        return self.x.shape[1]

    @property
    def input_size(self) -> int:
        return self.x.shape[2]

    @property
    def hidden_size(self) -> int:
        return self.w_hh.shape[0] // GATES[self.cell]

    @property
    def output_size(self) -> int:
        return self.h0.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    def describe(self) -> str:
        proj = f" proj={self.output_size}" if self.w_hr is not None else ""
        extras = "".join(
            [" reverse" if self.reverse else "", " lengths" if self.lengths is not None else "",
             " bias" if self.b_ih is not None else " no-bias"])
        return (f"{self.cell} T={self.seq_len} B={self.batch_size} I={self.input_size} "
                f"H={self.hidden_size}{proj} {str(self.dtype).replace('torch.', '')} "
                f"{self.device.type}{extras}")


class Backend:
    """A named implementation of the layer op. Subclasses say what they can run and run it."""

    name: str = ""

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None when the backend can run on this device type at all, else why not."""
        raise NotImplementedError

    def unsupported_reason(self, call: LayerCall) -> Optional[str]:
        """None when this particular call is supported (device availability already checked)."""
        return None

    def forward(self, call: LayerCall, need_workspace: bool):
        """Returns (y [T,B,H_out], h_n [B,H_out], c_n [B,H] or empty, workspace [T,B,W] or empty)."""
        raise NotImplementedError

    def backward(self, call: LayerCall, y: Tensor, workspace: Tensor, grad_y: Tensor, grad_h_n: Tensor,
                 grad_c_n: Optional[Tensor]):
        """Returns the gradients of (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr); absent ones as empty tensors."""
        raise NotImplementedError


def empty_problem_reason(call: LayerCall) -> Optional[str]:
    """Why a kernel backend does not take `call`: an empty problem (T, B or H of 0) has nothing to compute, and
    the kernels divide work by these sizes (the CPU kernel's B=0 was a SIGFPE). The reference backend runs it
    (and fusedrnn.functional never dispatches one: it runs the spec directly)."""
    if call.seq_len == 0 or call.batch_size == 0 or call.hidden_size == 0:
        return (f"empty problem (T={call.seq_len}, B={call.batch_size}, H={call.hidden_size}): nothing to compute; "
                "the reference backend runs it")
    return None


def previous_states(y: Tensor, h0: Tensor, reverse: bool, lengths: Optional[Tensor]) -> Tensor:
    """[T, B, H] tensor of the state each valid step started from, read back from y (see module doc)."""
    init = h0.unsqueeze(0)
    if y.shape[0] == 0:
        return y
    if not reverse:
        # Valid step t >= 1 follows valid step t-1, whose output is the state.
        return torch.cat([init, y[:-1]], 0)
    shifted = torch.cat([y[1:], init], 0)
    if lengths is None:
        return shifted
    T = y.shape[0]
    steps = torch.arange(1, T + 1, device=y.device).unsqueeze(1)  # t + 1
    follows_valid = (steps < lengths.to(y.device).unsqueeze(0)).unsqueeze(-1)
    return torch.where(follows_valid, shifted, init)


def valid_mask(seq_len: int, lengths: Optional[Tensor], device) -> Optional[Tensor]:
    """[T, B, 1] bool: step t of sequence b is valid; None when every step is."""
    if lengths is None:
        return None
    steps = torch.arange(seq_len, device=device).unsqueeze(1)
    return (steps < lengths.to(device).unsqueeze(0)).unsqueeze(-1)


@contextlib.contextmanager
def scoped_environ(values: Mapping[str, Optional[str]]) -> Iterator[None]:
    """Sets (None: unsets) environment variables for the block, then restores them. Forcing a backend or a
    path goes through the environment as well as use_backend: autograd runs CUDA backwards on its own
    thread, which does not see use_backend's context variable."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
