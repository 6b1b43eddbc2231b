"""Backend "triton": the Triton kernels of fusedrnn/triton, on CUDA tensors (or CPU tensors in Triton's
interpreter, TRITON_INTERPRET=1, for testing).

Three paths, chosen per call (`plan`), or forced with `use_path(...)` / $FUSEDRNN_TRITON_PATH:
  persistent   one launch for all steps, the recurrent matrix of a batch tile in one program
               (rnn_persistent.py, no barrier); taken whenever the weights fit one program
  barrier      one launch for all steps, hidden units split across programs that meet at a grid barrier
               every step; CUDA only, only when every program can be resident (in the interpreter only
               inside concurrent_interpreter.concurrent_programs(), which runs every program in a thread)
  alternating  per step one torch GEMM for the recurrent term + one fused gate kernel (rnn_pointwise.py);
               any size
Around every path: x @ W_ih^T for all steps is one GEMM before; after the backward loop dx, dW_ih, dW_hh,
dW_hr and the biases are one GEMM / sum each. Half inputs: GEMMs in the input dtype (fp32 accumulation),
gate math and carried state in fp32.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Iterator, Optional

import torch

from ..triton import concurrent_interpreter
from .base import Backend, LayerCall, empty_problem_reason, previous_states

logger = logging.getLogger("fusedrnn")

PATHS = ("auto", "persistent", "barrier", "alternating")
_path: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fusedrnn_triton_path", default=None)
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def current_path() -> str:
    """use_path(...), else $FUSEDRNN_TRITON_PATH, else 'auto'."""
    name = _path.get() or os.environ.get("FUSEDRNN_TRITON_PATH", "").strip() or "auto"
    if name not in PATHS:
        raise ValueError(f"FUSEDRNN_TRITON_PATH: unknown Triton path {name!r}; expected one of {list(PATHS)}")
    return name


@contextlib.contextmanager
def use_path(name: str) -> Iterator[None]:
    """Force the Triton backend's path inside the block ('auto' restores the automatic choice). A call the
    forced path cannot run is refused with the reason (and falls back under use_backend('auto'))."""
    if name not in PATHS:
        raise ValueError(f"use_path: unknown Triton path {name!r}; expected one of {list(PATHS)}")
    token = _path.set(name)
    try:
        yield
    finally:
        _path.reset(token)


def _kernels():
    """The kernel modules (imports triton; the kernels are interpreter functions if TRITON_INTERPRET=1 was
    set when they were first imported)."""
    from ..triton import cell_math, rnn_persistent, rnn_pointwise
    return cell_math, rnn_persistent, rnn_pointwise


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan(call: LayerCall):
    """(path, slice_h, None) for the call under the current path setting, or (None, None, reason)."""
    cell_math, P, _ = _kernels()
    setting = current_path()
    cell, H, HO, B = call.cell, call.hidden_size, call.output_size, call.batch_size
    elem = call.x.element_size()
    has_proj = call.w_hr is not None
    if setting == "alternating":
        return "alternating", None, None

    steps = P.steps_reason(call.seq_len)
    if steps is not None:  # (the alternating path takes any T)
        if setting in ("persistent", "barrier"):
            return None, None, f"{setting} path: {steps}"
        return "alternating", None, None
    fits = P.no_barrier_fits(cell, H, HO, elem, has_proj)
    if setting == "persistent" or (setting == "auto" and fits):
        if fits:
            return "persistent", None, None
        need = P.weight_bytes(cell, P.block(H), P.block(HO), elem, has_proj)
        return None, None, (f"persistent path: H={H} needs {need // 1024} KB of recurrent weights and "
                            f"{P.gate_rows(cell, P.block(H), elem)} gate rows (fp32 counts twice) in one "
                            f"program; the budget is {P.WEIGHT_BUDGET // 1024} KB and {P.MAX_GATE_ROWS} rows")

    why = None
    slice_h = P.barrier_slice(cell, H, elem)
    interpret_concurrently = cell_math.INTERPRET and concurrent_interpreter.active()
    if cell_math.INTERPRET and not interpret_concurrently:
        why = ("barrier path: the interpreter runs programs one after another, so a grid barrier would wait "
               "forever (fusedrnn.triton.concurrent_interpreter.concurrent_programs() runs them concurrently)")
    elif call.device.type != "cuda" and not interpret_concurrently:
        why = f"barrier path: needs CUDA tensors, got {call.device.type}"
    elif has_proj:
        why = "barrier path: the projection needs all hidden units of a step in one program"
    elif elem == 4:
        why = "barrier path: fp16/bf16 only (fp32's split tf32x3 operands spill on sm_90)"
    elif P.block(H) > P.BARRIER_MAX_BLOCK:
        why = (f"barrier path: H={H} is over {P.BARRIER_MAX_BLOCK}, the widest h every program can read per "
               f"step without spilling")
    elif slice_h is None:
        sl = min(P.BARRIER_SLICES)
        why = (f"barrier path: {sl} hidden units per program (the narrowest slice that runs on wgmma) need "
               f"{P.weight_bytes(cell, sl, P.block(H), elem) // 1024} KB of weights at H={H}, over the "
               f"{P.WEIGHT_BUDGET // 1024} KB budget" if P.block(H) > sl else
               f"barrier path: H={H} is narrower than one slice of {sl} hidden units")
    elif P.barrier_counter_reason(call.seq_len, -(-H // slice_h)) is not None:
        why = "barrier path: " + P.barrier_counter_reason(call.seq_len, -(-H // slice_h))
    elif not interpret_concurrently:  # there every program is a thread: all are resident
        programs = -(-B // P.BLOCK_B) * -(-H // slice_h)
        sms = _sm_count(call.device)
        if programs > sms:
            why = (f"barrier path: {programs} programs ({-(-B // P.BLOCK_B)} batch tiles x "
                   f"{-(-H // slice_h)} slices) cannot all be resident on {sms} SMs")
    if why is None:
        return "barrier", slice_h, None
    if setting == "barrier":
        return None, None, why
    return "alternating", None, None


def step_width_reason(call: LayerCall) -> Optional[str]:
    """Why one step is too wide for the kernels, or None. Offsets within a step -- program id (batch row) times
    row width, as in `b * 4 * H` -- are int32 arithmetic (only the step offset t * B * W is int64), so every
    [B, W] block a step touches must hold fewer than 2^31 elements."""
    from .base import workspace_width
    G = call.w_hh.shape[0] // max(call.hidden_size, 1)
    W = max(G * call.hidden_size, workspace_width(call.cell, call.hidden_size, call.w_hr is not None),
            call.output_size)
    if call.batch_size * W > 2**31 - 1:
        return (f"B * W = {call.batch_size} * {W} = {call.batch_size * W} elements per step (W: the widest row, "
                f"gates or workspace): the kernels index within a step in int32 (at most {2**31 - 1})")
    return None


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, device):
        if device.type not in ("cuda", "cpu"):
            return f"runs on CUDA tensors (CPU tensors in the Triton interpreter), got {device.type}"
        try:
            cell_math, _, _ = _kernels()
        except Exception as e:  # noqa: BLE001  (any import failure means: not available, and why)
            return f"triton cannot be imported: {type(e).__name__}: {e}"
        if device.type == "cpu" and not cell_math.INTERPRET:
            if os.environ.get("TRITON_INTERPRET", "0") == "1":
                return ("TRITON_INTERPRET=1 was set after fusedrnn's Triton kernels were imported; set it before "
                        "importing fusedrnn to run them on CPU tensors")
            return ("Triton kernels run on CUDA tensors; on CPU tensors only in Triton's interpreter "
                    "(TRITON_INTERPRET=1)")
        if device.type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        return None

    def unsupported_reason(self, call: LayerCall):
        if call.dtype not in _SUPPORTED_DTYPES:
            return f"the Triton kernels take fp32, fp16 and bf16, got {str(call.dtype).replace('torch.', '')}"
        empty = empty_problem_reason(call)
        if empty is not None:
            return empty
        wide = step_width_reason(call)
        if wide is not None:
            return wide
        if call.device.type == "cuda" and call.dtype == torch.bfloat16 and \
                torch.cuda.get_device_capability(call.device) < (8, 0):
            return "bf16 tl.dot needs compute capability 8.0 or newer"
        try:
            path, _, why = plan(call)
        except ValueError as e:  # a bad FUSEDRNN_TRITON_PATH
            return str(e)
        return why

    # -----------------------------------------------------------------------------------------------
    def forward(self, call: LayerCall, need_workspace: bool):
        _, P, PW = _kernels()
        cell, T, B, H = call.cell, call.seq_len, call.batch_size, call.hidden_size
        x = call.x
        G = call.w_hh.shape[0] // H
        HO = call.output_size
        if B == 0:
            from .base import workspace_width
            W = workspace_width(cell, H, call.w_hr is not None)
            return (x.new_empty(T, 0, HO), x.new_empty(0, HO), x.new_empty(0, H) if cell == "lstm" else x.new_empty(0),
                    x.new_empty(T, 0, W) if need_workspace else x.new_empty(0))
        path, slice_h, why = plan(call)
        if path is None:
            raise RuntimeError(f"fusedrnn triton backend cannot run {call.describe()}: {why}")
        logger.debug("triton %s path for %s", path, call.describe())
        contig = lambda t: None if t is None else t.contiguous()  # noqa: E731
        fp32 = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
        h0, c0, w_hh, w_hr = map(contig, (call.h0, call.c0, call.w_hh, call.w_hr))
        b_ih, b_hh = fp32(call.b_ih), fp32(call.b_hh)
        # x @ W_ih^T for all steps: one GEMM (biases are added in fp32 by the kernels)
        xg = torch.mm(x.reshape(T * B, -1), call.w_ih.t()).view(T, B, G * H)
        lengths = contig(call.lengths)
        args = (cell, xg, b_ih, b_hh, h0, c0, w_hh, w_hr, lengths, call.reverse, need_workspace)
        with _on_device(x.device):
            if path == "alternating":
                y, h_n, c_n, ws = PW.alternating_forward(*args)
            else:
                y, h_n, c_n, ws = P.persistent_forward(*args, slice_h=slice_h)
        if c_n is None:
            c_n = x.new_empty(0)
        if ws is None:
            ws = x.new_empty(T, B, 0) if need_workspace else x.new_empty(0)
        return y, h_n, c_n, ws

    def backward(self, call: LayerCall, y, workspace, grad_y, grad_h_n, grad_c_n):
        _, P, PW = _kernels()
        cell, T, B, H = call.cell, call.seq_len, call.batch_size, call.hidden_size
        x, dt = call.x, call.dtype
        has_bias, has_proj = call.b_ih is not None, call.w_hr is not None
        empty = lambda: x.new_empty(0)  # noqa: E731
        if B == 0:
            zeros = lambda t: empty() if t is None else torch.zeros_like(t)  # noqa: E731
            return (torch.zeros_like(x), torch.zeros_like(call.h0), zeros(call.c0), torch.zeros_like(call.w_ih),
                    torch.zeros_like(call.w_hh), zeros(call.b_ih), zeros(call.b_hh), zeros(call.w_hr))
        path, slice_h, why = plan(call)
        if path is None:
            raise RuntimeError(f"fusedrnn triton backend cannot run {call.describe()}: {why}")
        logger.debug("triton %s path for %s (backward)", path, call.describe())
        contig = lambda t: None if t is None else t.contiguous()  # noqa: E731
        h0, c0, w_hh, w_hr, lengths = map(contig, (call.h0, call.c0, call.w_hh, call.w_hr, call.lengths))
        y, ws, gy, ghn = map(contig, (y, workspace, grad_y, grad_h_n))
        gcn = contig(grad_c_n) if cell == "lstm" else None
        if cell == "lstm" and gcn is None:
            gcn = torch.zeros_like(c0)
        args = (cell, ws, y, h0, c0, w_hh, w_hr, lengths, call.reverse, gy, ghn, gcn)
        with _on_device(x.device):
            if path == "alternating":
                dgx, dgh, gout, gh0, gc0 = PW.alternating_backward(*args)
            else:
                dgx, dgh, gout, gh0, gc0 = P.persistent_backward(*args, slice_h=slice_h)

        # Everything off the recurrence: one GEMM or sum each over all T*B rows.
        gx2 = dgx.reshape(T * B, -1)
        gh2 = dgh.reshape(T * B, -1)
        grad_x = torch.mm(gx2, call.w_ih).view(T, B, -1)
        grad_w_ih = torch.mm(gx2.t(), x.reshape(T * B, -1))
        h_prev = previous_states(y, h0, call.reverse, lengths)
        grad_w_hh = torch.mm(gh2.t(), h_prev.reshape(T * B, -1))
        grad_b_ih = gx2.sum(0, dtype=torch.float32).to(dt) if has_bias else empty()
        grad_b_hh = gh2.sum(0, dtype=torch.float32).to(dt) if has_bias else empty()
        if has_proj:
            r = ws[..., 5 * H:6 * H]
            if lengths is not None:  # rows of invalid steps are unused in the layout: may hold anything
                valid = torch.arange(T, device=x.device)[:, None, None] < lengths[None, :, None]
                r = torch.where(valid, r, torch.zeros((), dtype=dt, device=x.device))
            grad_w_hr = torch.mm(gout.reshape(T * B, -1).t(), r.reshape(T * B, -1))
        else:
            grad_w_hr = empty()
        grad_c0 = gc0.to(dt) if cell == "lstm" else empty()
        return grad_x, gh0.to(dt), grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr
