"""Shared test helpers: random layer arguments and the one tolerance rule of the test suite.

Tolerance rule (flash-attention's): a fast path run at dtype d is compared with the fp64 reference, and its
error may be at most FACTOR times the error PyTorch itself makes at d -- the reference run natively in d
(`compute_dtype=d`) on the same inputs -- plus a floor of a few units in the last place of d for outputs
that the native run happens to get exactly right. fp64 and fp32 fast paths get fixed, tight bounds.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fusedrnn import ops, reference

FACTOR = 2.0
# Fixed bounds for full precision (relative to max(1, |ref|)): fp64 agrees to rounding; fp32 to ~1e-6
# per op, accumulated over T steps of O(H) sums.
FULL_PRECISION_TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
ULP_FLOOR = {torch.float16: 4 * 2.0 ** -10, torch.bfloat16: 4 * 2.0 ** -7}

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def make_layer_args(cell: str, T: int, B: int, I: int, H: int, proj: int = 0, bias: bool = True,
                    dtype=torch.float64, device="cpu", lengths: Optional[list] = None, reverse: bool = False,
                    seed: int = 0, requires_grad: bool = True, scale: float = 1.0) -> dict:
    """Keyword arguments of reference.rnn_layer / functional.rnn_layer, weights ~ U(-1/sqrt(H), 1/sqrt(H))
    as torch.nn initialises them (times `scale`), inputs ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    G = reference.GATES[cell]
    H_out = proj if proj else H
    k = scale / H ** 0.5

    def uni(*shape):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * k).to(dtype).to(device)

    def normal(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    args = dict(
        x=normal(T, B, I), h0=normal(B, H_out) * 0.5, c0=normal(B, H) * 0.5 if cell == "lstm" else None,
        w_ih=uni(G * H, I), w_hh=uni(G * H, H_out), b_ih=uni(G * H) if bias else None,
        b_hh=uni(G * H) if bias else None, w_hr=uni(H_out, H) if proj else None, reverse=reverse,
        lengths=None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=device))
    if requires_grad:
        for name, t in args.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.requires_grad_(True)
    return args


def tensor_args(args: dict) -> dict:
    """The differentiable tensors of a make_layer_args dict, by name."""
    return {n: t for n, t in args.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}


def cast_args(args: dict, dtype, requires_grad: bool = True) -> dict:
    out = {}
    for n, t in args.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().to(dtype)
            if requires_grad:
                t.requires_grad_(True)
        out[n] = t
    return out


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item()


def tolerance(dtype, native_error: float = 0.0, scale: float = 1.0) -> float:
    """Allowed max error of a fast path at `dtype` against the fp64 reference (see module doc)."""
    if dtype in FULL_PRECISION_TOL:
        return FULL_PRECISION_TOL[dtype] * max(1.0, scale)
    return FACTOR * native_error + ULP_FLOOR[dtype] * max(1.0, scale)


def assert_close_to_reference(name: str, fast: torch.Tensor, ref64: torch.Tensor,
                              ref_native: Optional[torch.Tensor] = None) -> None:
    """fast: result at its dtype; ref64: fp64 reference; ref_native: reference computed natively at fast's
    dtype (needed for fp16/bf16)."""
    assert fast.shape == ref64.shape, f"{name}: shape {list(fast.shape)} != reference {list(ref64.shape)}"
    scale = ref64.detach().abs().max().item() if ref64.numel() else 1.0
    native = max_error(ref_native, ref64) if ref_native is not None else 0.0
    tol = tolerance(fast.dtype, native, scale)
    err = max_error(fast, ref64)
    assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g} ({fast.dtype}, native error {native:.3g})"


def run_and_grad(fn, args: dict, seed: int = 1):
    """Calls fn(**args) -> (y, h_n, c_n), backpropagates fixed random cotangents, returns (outputs, grads)."""
    outs = [o for o in fn(**args) if o is not None]
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
               for o in outs)
    inputs = tensor_args(args)
    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    return outs, dict(zip(inputs, grads))


def compare_with_reference(cell: str, args64: dict, dtype, run_fast, native=None, close=None) -> None:
    """The whole check of a fast path: `run_fast(args)` -> (outputs, grads) as run_and_grad gives them, on
    args64 cast to `dtype`, against the fp64 spec -- every output and every gradient, each of `dtype`.
    The tolerance rule above; the native error comes from the spec run natively in `native` (default:
    `dtype` when it is fp16/bf16). `close(name, fast, ref64, ref_native)` replaces the comparison."""
    ref_out, ref_grads = run_and_grad(lambda **a: reference.rnn_layer(cell, **a), args64)
    native = dtype if native is None else native
    native_out = native_grads = None
    if native in (torch.float16, torch.bfloat16):
        native_out, native_grads = run_and_grad(
            lambda **a: reference.rnn_layer(cell, **a, compute_dtype=native), cast_args(args64, native))
    out, grads = run_fast(cast_args(args64, dtype))
    close = close or assert_close_to_reference
    assert len(out) == len(ref_out)
    for i, (o, r) in enumerate(zip(out, ref_out)):
        assert o.dtype == dtype
        close(("y", "h_n", "c_n")[i], o, r, native_out[i] if native_out else None)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert g is not None and g.dtype == dtype, name
        close(f"grad {name}", g, ref_grads[name], native_grads[name] if native_grads else None)


def check_inputs_not_modified(cell: str, args: dict, context) -> None:
    """Forward and backward of the layer under `context` (a backend/path context manager) leave every input
    and every cotangent as they were."""
    from fusedrnn import functional
    before = {n: t.detach().clone() for n, t in args.items() if isinstance(t, torch.Tensor)}
    with context:
        outs = [o for o in functional.rnn_layer(cell, **args) if o is not None]
        cot = [torch.ones_like(o) for o in outs]
        keep = [c.clone() for c in cot]
        torch.autograd.grad(outs, [args["x"], args["h0"], args["w_hh"]], cot)
    for n, t in before.items():
        assert torch.equal(args[n].detach(), t), f"{n} was modified"
    for c, k in zip(cot, keep):
        assert torch.equal(c, k), "a cotangent was modified"


def in_fresh_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) on a new thread (returns its result, re-raises its exception).

    Tests that compare many dtypes in one process run each case here, on a thread whose per-thread kernel
    state (csrc/cpu's scratch buffers) is new, so that each checks the numbers it is about and not the order
    the cases ran in. Reuse across dtypes is tested on its own:
    test_conformance.py::test_float64_call_after_float32_call (an fp64 call after an fp32 one failed before).
    Context variables (fusedrnn.use_backend) do not cross threads: enter them inside fn."""
    import threading

    box = {}

    def run():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001  (re-raised on the caller's thread)
            box["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


# ---------------------------------------------------------------------------------------------------------
# fusedrnn modules against torch.nn modules (test_conformance, test_fuzz)
# ---------------------------------------------------------------------------------------------------------
def flatten(out):
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flatten(o)]


def detach_clone(obj):
    if isinstance(obj, PackedSequence):
        return obj._replace(data=detach_clone(obj.data))
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().requires_grad_(obj.requires_grad)
    if isinstance(obj, (tuple, list)):
        return type(obj)(detach_clone(o) for o in obj)
    return obj


def assert_close_to_torch(name, got, want):
    assert isinstance(got, torch.Tensor), f"{name}: fusedrnn gives {type(got).__name__}"
    assert got.shape == want.shape, f"{name}: shape {list(got.shape)} != torch.nn's {list(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != torch.nn's {want.dtype}"
    if want.numel() == 0:
        return
    scale = max(1.0, want.detach().abs().max().item())
    tol = FULL_PRECISION_TOL[want.dtype] * scale
    err = (got.detach().double() - want.detach().double()).abs().max().item()
    assert err <= tol, f"{name}: max |fusedrnn - torch.nn| = {err:.3g} > {tol:.3g} ({want.dtype})"


def compare_calls(ref_fn, our_fn, args, ref_params, our_params, second_order: bool) -> int:
    """Runs ref_fn (torch.nn) and our_fn (fusedrnn) on copies of `args`; compares outputs, the first gradients
    of every input tensor that requires grad and of the parameters, and (second_order) the second derivatives
    of a random linear function of those gradients. Returns the number of tensors compared."""
    ref_args, our_args = detach_clone(args), detach_clone(args)
    ref_out, our_out = flatten(ref_fn(*ref_args)), flatten(our_fn(*our_args))
    assert len(ref_out) == len(our_out), f"{len(our_out)} outputs, torch.nn gives {len(ref_out)}"
    for i, (o, r) in enumerate(zip(our_out, ref_out)):
        assert_close_to_torch(f"output {i}", o, r)

    ref_leaves = [t for t in flatten(ref_args) if t.requires_grad] + list(ref_params)
    our_leaves = [t for t in flatten(our_args) if t.requires_grad] + list(our_params)
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(r.dtype) for r in ref_out]
    ref_g = torch.autograd.grad(ref_out, ref_leaves, cot, create_graph=second_order, allow_unused=True)
    our_g = torch.autograd.grad(our_out, our_leaves, cot, create_graph=second_order, allow_unused=True)
    compared = len(ref_out)
    for i, (o, r) in enumerate(zip(our_g, ref_g)):
        if r is None:  # torch.nn's output does not depend on it: fusedrnn's gradient must be None or 0
            assert o is None or not o.any(), f"gradient {i}: torch.nn has none, fusedrnn {o}"
            continue
        assert o is not None, f"gradient {i}: fusedrnn gives None, torch.nn a gradient"
        assert_close_to_torch(f"gradient {i}", o, r)
        compared += 1
    if not second_order:
        return compared
    # A random linear function of all first gradients, differentiated again w.r.t. everything.
    pairs = [(o, r) for o, r in zip(our_g, ref_g) if r is not None and r.requires_grad]
    assert pairs, "torch.nn's first gradients carry no graph"
    weights = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(r.dtype) for _, r in pairs]
    ref_s = sum((r * w).sum() for (_, r), w in zip(pairs, weights))
    our_s = sum((o * w).sum() for (o, _), w in zip(pairs, weights))
    ref_gg = torch.autograd.grad(ref_s, ref_leaves, allow_unused=True)
    our_gg = torch.autograd.grad(our_s, our_leaves, allow_unused=True)
    for i, (o, r) in enumerate(zip(our_gg, ref_gg)):
        if r is None or not r.any():
            assert o is None or not o.any(), f"second derivative {i}: torch.nn's is zero, fusedrnn's is not"
            continue
        assert o is not None, f"second derivative {i}: fusedrnn gives None, torch.nn {r}"
        assert_close_to_torch(f"second derivative {i}", o, r)
        compared += 1
    return compared


def packed_layer_args(cell: str, T: int, B: int, I: int, H: int, lengths, proj: int = 0, seed: int = 0):
    """make_layer_args with x packed by `lengths` (sorted, longest first): (keyword arguments of packed_fast
    without the batch_sizes -- data in place of x --, batch_sizes, lengths)."""
    args = make_layer_args(cell, T, B, I, H, proj=proj, seed=seed, requires_grad=False)
    lengths = torch.as_tensor(lengths)
    packed = pack_padded_sequence(args["x"], lengths)
    keep = {n: args[n] for n in ("h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")}
    return dict(data=packed.data, **keep), packed.batch_sizes, lengths


def packed_spec(cell, batch_sizes, lengths, reverse, data, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                compute_dtype=None):
    """The spec of a layer call on packed data (cpu kernel, batch_sizes): the reference layer on the padded
    sorted batch, its output packed back."""
    x, _ = pad_packed_sequence(PackedSequence(data, batch_sizes))
    kw = {} if compute_dtype is None else dict(compute_dtype=compute_dtype)
    y, h_n, c_n = reference.rnn_layer(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths, **kw)
    return pack_padded_sequence(y, lengths).data, h_n, c_n


def packed_fast(cell, batch_sizes, reverse, data, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
    """The cpu kernel on packed data, through fusedrnn's eager packed path."""
    return ops.run_packed_layer(cell, data, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)


def outputs_and_grads(fn, args: dict, seed=1):
    """run_and_grad for keyword tensors that may be None: fresh leaves, the outputs and every gradient."""
    args = {n: (t.detach().clone().requires_grad_(True) if t is not None else None) for n, t in args.items()}
    outs = [o for o in fn(**args) if o is not None]
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
    names = [n for n, t in args.items() if t is not None]
    grads = torch.autograd.grad(loss, [args[n] for n in names])
    return outs, dict(zip(names, grads))
