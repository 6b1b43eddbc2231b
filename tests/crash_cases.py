"""Risky inputs, each a function run(backend) that checks fusedrnn against torch.nn (or a clean exception).

Run by tests/test_crash_isolation.py in a child process (`python tests/crash_cases.py BACKEND:NAME ...`), so
a segfault or SIGFPE in a kernel is a named failing test instead of a dead test run. The child prints
`START backend:name`, then `OK backend:name` or `FAIL backend:name: <error>` for each, flushing every line.
"""
from __future__ import annotations

import os
import sys
import threading
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # helpers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fusedrnn

import torch  # noqa: E402

import fusedrnn  # noqa: E402
from helpers import FULL_PRECISION_TOL, compare_calls, flatten  # noqa: E402

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def _pair(name, *args, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(torch.nn, name)(*args, dtype=dtype, **kw)
        ours = getattr(fusedrnn, name)(*args, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _compare(ref, ours, *args, second_order=False):
    compare_calls(ref, ours, args, list(ref.parameters()), list(ours.parameters()), second_order)


def _leaf(t):
    return t.requires_grad_() if t.is_leaf else t


# ---------------------------------------------------------------------------------------------------------
# Empty tensors and zero sizes
# ---------------------------------------------------------------------------------------------------------
@case
def empty_batch_modules(backend):
    for name in ("LSTM", "GRU", "RNN"):
        for bidirectional in (False, True):
            ref, ours = _pair(name, 3, 4, num_layers=2, bidirectional=bidirectional)
            _compare(ref, ours, torch.zeros(5, 0, 3, requires_grad=True))


@case
def empty_batch_layer_op(backend):
    """torch.ops.fusedrnn.rnn_layer itself (not through the modules) with B=0: the dispatcher must never hand
    it to a kernel that cannot take it ("auto" runs it on the reference; a named kernel backend refuses)."""
    x = torch.zeros(2, 0, 3, requires_grad=True)
    with fusedrnn.use_backend("auto"):
        y, h, c, _ = torch.ops.fusedrnn.rnn_layer("lstm", x, torch.zeros(0, 4), torch.zeros(0, 4),
                                                  torch.randn(16, 3), torch.randn(16, 4), None, None, None, None,
                                                  False, True)
        y.sum().backward()
    assert y.shape == (2, 0, 4) and h.shape == (0, 4) and x.grad.shape == x.shape


@case
def empty_batch_cpu_kernel(backend):
    """The C++ op with B=0 (the SIGFPE of issue #20): returns empty outputs without computing."""
    x = torch.zeros(2, 0, 3)
    out = torch.ops.fusedrnn.cpu_rnn_layer("gru", x, torch.zeros(0, 4), None, torch.randn(12, 3),
                                           torch.randn(12, 4), None, None, None, None, False, True)
    assert out[0].shape == (2, 0, 4)


@case
def zero_sizes_cells(backend):
    for name in ("LSTMCell", "GRUCell", "RNNCell"):
        for (I, H), shape in [((3, 0), (2, 3)), ((0, 4), (2, 0)), ((3, 4), (0, 3)), ((0, 0), (0, 0))]:
            ref, ours = _pair(name, I, H, dtype=torch.float64)
            _compare(ref, ours, torch.randn(shape, dtype=torch.float64, requires_grad=True), second_order=True)


@case
def huge_sizes_raise_cleanly(backend):
    """Sizes no machine can allocate raise the exception torch.nn raises, without crashing."""
    for build in (lambda ns: ns.LSTM(3, 2 ** 40), lambda ns: ns.GRUCell(2 ** 62, 4),
                  lambda ns: ns.LSTM(2 ** 61, 4, proj_size=2)):
        errors = []
        for ns in (torch.nn, fusedrnn):
            try:
                build(ns)
                errors.append(None)
            except Exception as e:  # noqa: BLE001
                errors.append(type(e))
        assert errors[0] is errors[1], f"torch.nn: {errors[0]}, fusedrnn: {errors[1]}"
    m = fusedrnn.GRU(3, 4)
    try:
        m(torch.randn(5, 2, 3), lengths=[2 ** 62, 1])
    except ValueError:
        pass
    else:
        raise AssertionError("a length of 2**62 was accepted")


# ---------------------------------------------------------------------------------------------------------
# Layouts: misaligned, strided, overlapping, expanded
# ---------------------------------------------------------------------------------------------------------
def _misaligned(*shape, dtype=torch.float32):
    n = 1
    for s in shape:
        n *= s
    return torch.randn(n + 1, dtype=dtype)[1:].view(shape)  # storage offset 1 element: not 16/32/64-byte aligned


@case
def misaligned_inputs_and_weights(backend):
    for name in ("LSTM", "GRU", "RNN"):
        ref, ours = _pair(name, 5, 7, bidirectional=True)
        for p_name, p in list(ours.named_parameters()):
            w = _misaligned(*p.shape)
            setattr(ours, p_name, torch.nn.Parameter(w))
            getattr(ref, p_name).data.copy_(w)
        h = _misaligned(2, 3, 7)
        hx = (h, _misaligned(2, 3, 7)) if name == "LSTM" else h
        hx = tuple(_leaf(t) for t in hx) if isinstance(hx, tuple) else _leaf(hx)
        _compare(ref, ours, _leaf(_misaligned(4, 3, 5)), hx)


@case
def strided_views(backend):
    for name in ("LSTM", "GRU", "RNN"):
        ref, ours = _pair(name, 5, 6, num_layers=2, batch_first=True)
        x = torch.randn(3, 8, 10)[:, ::2, ::2].requires_grad_()  # [B=3, T=4, I=5], every stride > 1
        h = torch.randn(3, 2, 6).transpose(0, 1).requires_grad_()  # [L, B, H], non-contiguous hx
        hx = (h, torch.randn(6, 3, 2).permute(2, 1, 0).requires_grad_()) if name == "LSTM" else h
        assert not x.is_contiguous() and not h.is_contiguous()
        _compare(ref, ours, x, hx)
        for p_name, p in list(ours.named_parameters()):  # transposed (non-contiguous) parameters
            if p.dim() == 2:
                setattr(ours, p_name, torch.nn.Parameter(p.detach().t().contiguous().t()))
        _compare(ref, ours, x, hx)
    ref, ours = _pair("LSTMCell", 5, 6)
    x = torch.randn(5, 4).t().requires_grad_()
    h = (torch.randn(6, 4).t().requires_grad_(), torch.randn(4, 12)[:, ::2].requires_grad_())
    _compare(ref, ours, x, h)


@case
def overlapping_memory(backend):
    """Stride-0 (broadcast) inputs and states: every batch row reads the same memory."""
    for name in ("LSTM", "GRU", "RNN"):
        ref, ours = _pair(name, 3, 4)
        x = torch.randn(5, 1, 3).expand(5, 4, 3)
        h = torch.randn(1, 1, 4).expand(1, 4, 4)
        hx = (h, torch.randn(1, 1, 4).expand(1, 4, 4)) if name == "LSTM" else h
        _compare(ref, ours, x, hx)
    ref, ours = _pair("GRUCell", 3, 4)
    _compare(ref, ours, torch.randn(1, 3).expand(6, 3), torch.randn(4).expand(6, 4))


@case
def expanded_weights(backend):
    """Parameters that are broadcast views (stride 0): a row repeated, a bias from one number."""
    for name, G in (("LSTM", 4), ("GRU", 3), ("RNN", 1)):
        ref, ours = _pair(name, 3, 4)
        ours.weight_ih_l0 = torch.nn.Parameter(torch.randn(1, 3).expand(G * 4, 3))
        ours.weight_hh_l0 = torch.nn.Parameter(torch.randn(G * 4, 1).expand(G * 4, 4))
        ours.bias_ih_l0 = torch.nn.Parameter(torch.tensor(0.3).expand(G * 4))
        ref.load_state_dict({k: v.contiguous() for k, v in ours.state_dict().items()})
        _compare(ref, ours, torch.randn(5, 2, 3, requires_grad=True))


# ---------------------------------------------------------------------------------------------------------
# Non-finite values: NaN and Inf propagate exactly as in torch.nn (same positions)
# ---------------------------------------------------------------------------------------------------------
@case
def nan_and_inf_inputs(backend):
    for name in ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"):
        cell = name.endswith("Cell")
        ref, ours = _pair(name, 3, 4)
        x = torch.randn((2, 3) if cell else (4, 2, 3))
        x[(0, 1) if cell else (1, 0, 1)] = float("nan")
        x[(1, 2) if cell else (2, 1, 2)] = float("inf")
        x[(1, 0) if cell else (0, 1, 0)] = -float("inf")
        outs = []
        for m in (ref, ours):
            xi = x.clone().requires_grad_()
            flat = flatten(m(xi))
            (grad,) = torch.autograd.grad(sum(f.sum() for f in flat), xi)
            outs.append([f.detach() for f in flat] + [grad])
        tol = FULL_PRECISION_TOL[torch.float32]  # the suite's one fp32 bound
        for a, b in zip(outs[1], outs[0]):
            torch.testing.assert_close(a, b, equal_nan=True, rtol=tol, atol=tol)


@case
def concurrent_threads_mixed_dtypes(backend):
    """Calls of different dtypes and shapes on two threads at once give each thread torch.nn's results."""
    errors = []

    def work(dtype, H):
        try:
            for _ in range(5):
                ref, ours = _pair("LSTM", 3, H, dtype=dtype)
                _compare(ref, ours, torch.randn(4, 3, 3, dtype=dtype, requires_grad=True))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def run(dtype, H):
        with fusedrnn.use_backend(backend):
            work(dtype, H)

    threads = [threading.Thread(target=run, args=(d, H)) for d, H in ((torch.float32, 5), (torch.float64, 7))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def main(jobs: list[str]) -> None:
    """jobs: "backend:name" each."""
    for job in jobs:
        backend, name = job.split(":")
        print(f"START {job}", flush=True)
        try:
            with fusedrnn.use_backend(backend):
                CASES[name](backend)
        except Exception as e:  # noqa: BLE001
            last = traceback.format_exception(e)[-3:]
            print(f"FAIL {job}: {type(e).__name__}: {e} | {''.join(last)!r}", flush=True)
        else:
            print(f"OK {job}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
