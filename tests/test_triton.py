"""The "triton" backend against the spec.

On a machine without a GPU the kernels run on CPU tensors in Triton's interpreter (conftest sets
TRITON_INTERPRET=1): every kernel (the persistent recurrence without barrier and the fused gate kernels of the
alternating path) at small odd shapes, every cell, both directions, lengths, fp32/fp16/bf16, forward and all
gradients. The barrier variant cannot run in the stock interpreter (programs run one after another); its
refusal is tested here, its numerics with several slices in tests/test_triton_barrier.py (programs in threads)
and in the GPU tests at the end (@pytest.mark.gpu, real sizes).

Tolerance: tests/helpers.py -- fp32 fixed; fp16/bf16 within 2x the error of the reference run natively at
that dtype (`compute_dtype=dtype`) plus a few ulp.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
import torch

import fusedrnn
from fusedrnn import functional, reference
from fusedrnn.backends import BACKENDS, BackendUnsupportedError, LayerCall, scoped_environ, select_backend
from fusedrnn.backends.triton import plan, use_path
from helpers import (CELLS, assert_close_to_reference, cast_args, check_inputs_not_modified, compare_with_reference,
                     interpreting_triton, make_layer_args, max_error, run_and_grad)

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting_triton():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CELL_PROJ = [(c, False) for c in CELLS] + [("lstm", True)]
CELL_IDS = [c + ("-proj" if p else "") for c, p in CELL_PROJ]
PATHS = ["persistent", "alternating"]


@pytest.fixture
def launches(monkeypatch):
    """Counts the launcher calls of each path, so a test proves which path ran."""
    from fusedrnn.triton import rnn_persistent, rnn_pointwise
    counts = {}

    def spy(module, name, key):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[key] = counts.get(key, 0) + 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    spy(rnn_persistent, "persistent_forward", "persistent_forward")
    spy(rnn_persistent, "persistent_backward", "persistent_backward")
    spy(rnn_pointwise, "alternating_forward", "alternating_forward")
    spy(rnn_pointwise, "alternating_backward", "alternating_backward")
    return counts


@contextlib.contextmanager
def on_triton(path):
    """Backend "triton" on `path`. Also through the environment: on CUDA, autograd runs the backward on its
    own thread, which does not see the context variables of use_backend / use_path."""
    with scoped_environ({"FUSEDRNN_BACKEND": "triton", "FUSEDRNN_TRITON_PATH": path}), \
            fusedrnn.use_backend("triton"), use_path(path):
        yield


def _proj_size(H: int, proj: bool) -> int:
    return max(1, H // 2) if proj and H > 1 else 0


def check_against_reference(cell, T, B, I, H, dtype, path, proj=False, reverse=False, lengths=None, bias=True,
                            seed=0):
    """Forward and every gradient of the triton backend on `path` vs the fp64 spec (see module doc)."""
    args64 = make_layer_args(cell, T, B, I, H, proj=_proj_size(H, proj), bias=bias, reverse=reverse,
                             lengths=lengths, seed=seed, device=DEVICE)

    def run_fast(args):
        with on_triton(path):
            return run_and_grad(lambda **a: functional.rnn_layer(cell, **a), args)

    compare_with_reference(cell, args64, dtype, run_fast)


# ---------------------------------------------------------------------------------------------------------
# Every cell x dtype x direction x lengths, on both interpreter-runnable paths
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [None, [5, 1, 3]], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("cell,proj", CELL_PROJ, ids=CELL_IDS)
@pytest.mark.parametrize("path", PATHS)
def test_layer_matches_reference(path, cell, proj, dtype, reverse, lengths, launches):
    check_against_reference(cell, T=5, B=3, I=4, H=7, dtype=dtype, path=path, proj=proj, reverse=reverse,
                            lengths=lengths)
    assert launches == {f"{path}_forward": 1, f"{path}_backward": 1}


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell,proj", CELL_PROJ, ids=CELL_IDS)
@pytest.mark.parametrize("path", PATHS)
def test_zero_length_sequence(path, cell, proj, reverse):
    """A sequence of length 0 keeps h0 (and c0), outputs zeros and passes its state gradients straight
    through; the longest sequence is not the first."""
    check_against_reference(cell, T=5, B=3, I=4, H=7, dtype=torch.float32, path=path, proj=proj,
                            reverse=reverse, lengths=[2, 5, 0])


SHAPES = {  # T, B, I, H, bias
    "T1-B1-I1-H1": (1, 1, 1, 1, True),
    "T3-B1-I2-H16-nobias": (3, 1, 2, 16, False),
    "T4-B3-I3-H63": (4, 3, 3, 63, True),
    "T8-B4-I5-H64": (8, 4, 5, 64, True),
    "T3-B11-I2-H9": (3, 11, 2, 9, True),  # two batch tiles of the persistent kernel, the second partial
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("cell,proj", CELL_PROJ, ids=CELL_IDS)
@pytest.mark.parametrize("path", PATHS)
def test_odd_shapes(path, cell, proj, shape):
    T, B, I, H, bias = SHAPES[shape]
    if shape == "T8-B4-I5-H64" and path == "alternating" and cell != "lstm":
        pytest.skip("the per-step kernels are shape-independent; one cell at the large shape")
    lengths = [T] + [max(0, T - 2 - b) for b in range(B - 1)]
    check_against_reference(cell, T, B, I, H, torch.float32, path, proj=proj, bias=bias, lengths=lengths,
                            reverse=H % 2 == 1)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("cell,proj", CELL_PROJ, ids=CELL_IDS)
@pytest.mark.parametrize("path", PATHS)
def test_larger_every_dtype(path, cell, proj, dtype):
    check_against_reference(cell, T=8, B=4, I=6, H=63, dtype=dtype, path=path, proj=proj, reverse=True,
                            lengths=[8, 3, 6, 1])


# ---------------------------------------------------------------------------------------------------------
# The barrier variant's code in the interpreter, where it cannot hang: one slice per batch tile (a program
# waits only for itself), and several slices for one step (the forward skips the barrier after its last step)
# ---------------------------------------------------------------------------------------------------------
def _launcher_run(cell, a, slice_h, reverse, with_backward=True):
    from fusedrnn.triton import rnn_persistent as P
    xg = (a["x"] @ a["w_ih"].t()).contiguous()
    b_ih, b_hh = a["b_ih"].float(), a["b_hh"].float()  # the launchers take fp32 biases
    fwd = P.persistent_forward(cell, xg, b_ih, b_hh, a["h0"], a["c0"], a["w_hh"], a["w_hr"], a["lengths"], reverse,
                               True, slice_h=slice_h)
    if not with_backward:
        return [t for t in fwd if t is not None]
    g = torch.Generator().manual_seed(2)
    rnd = lambda t: None if t is None else torch.randn(t.shape, generator=g).to(t)  # noqa: E731
    bwd = P.persistent_backward(cell, fwd[3], fwd[0], a["h0"], a["c0"], a["w_hh"], a["w_hr"], a["lengths"], reverse,
                                rnd(fwd[0]), rnd(a["h0"]), rnd(a["c0"]), slice_h=slice_h)
    return [t for t in list(fwd) + list(bwd) if t is not None]


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter only (on a GPU the real barrier runs in the GPU tests)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_barrier_variant_single_slice_equals_no_barrier(cell, dtype):
    """BARRIER=True with one slice: the state goes through the exchange buffers (ping-pong slots, padded rows,
    h0 at step 0) and the atomic counter of each of two batch tiles; results equal the no-barrier kernel's."""
    from fusedrnn.triton import rnn_persistent as P
    lengths = [5, 1, 3, 0, 2, 5, 4, 1, 3, 2, 5]  # 11 sequences: two batch tiles
    a = make_layer_args(cell, 5, 11, 4, 7, dtype=dtype, requires_grad=False, reverse=True, lengths=lengths)
    plain = _launcher_run(cell, a, None, True)
    barrier = _launcher_run(cell, a, P.block(7), True)
    assert len(plain) == len(barrier)
    for i, (p, b) in enumerate(zip(plain, barrier)):
        assert torch.equal(p, b), f"output {i}: {max_error(p, b):.3g}"


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter only")
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_barrier_forward_several_slices_one_step(cell):
    """Four slices of 16 units (H=50): each program computes its own units from the whole h0; T=1, so no
    program waits (the forward has no barrier after its last step)."""
    a = make_layer_args(cell, 1, 3, 4, 50, dtype=torch.float32, requires_grad=False, lengths=[1, 0, 1])
    plain = _launcher_run(cell, a, None, False, with_backward=False)
    split = _launcher_run(cell, a, 16, False, with_backward=False)
    for i, (p, b) in enumerate(zip(plain, split)):
        assert_close_to_reference(f"output {i}", b, p)


# ---------------------------------------------------------------------------------------------------------
# The workspace contract: any backward consumes any forward
# ---------------------------------------------------------------------------------------------------------
def _op(cell, a, need_workspace=True):
    return torch.ops.fusedrnn.rnn_layer(cell, a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                                        a["w_hr"], a["lengths"], a["reverse"], need_workspace)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell,proj", CELL_PROJ, ids=CELL_IDS)
def test_workspace_layout_equals_reference(cell, proj, path):
    lengths = [4, 1, 3]
    a = make_layer_args(cell, 4, 3, 3, 5, proj=_proj_size(5, proj), dtype=torch.float32, lengths=lengths,
                        reverse=True, requires_grad=False, device=DEVICE)
    with fusedrnn.use_backend("reference"):
        ref = _op(cell, a)
    with fusedrnn.use_backend("triton"), use_path(path):
        out = _op(cell, a)
        inference = _op(cell, a, need_workspace=False)
    valid = (torch.arange(4, device=DEVICE)[:, None] < a["lengths"][None, :])[..., None]
    for name, o, r in zip(["y", "h_n", "c_n"], out, ref):
        assert_close_to_reference(name, o, r)
    assert out[3].shape == ref[3].shape
    assert_close_to_reference("workspace (valid rows)", torch.where(valid, out[3], 0), torch.where(valid, ref[3], 0))
    assert inference[3].numel() == 0
    for name, o, r in zip(["y", "h_n", "c_n"], inference, out):
        assert torch.equal(o, r), name


@pytest.mark.parametrize("fwd,bwd", [("triton", "reference"), ("reference", "triton")])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell,proj", [("lstm", True), ("gru", False), ("rnn_tanh", False)],
                         ids=["lstm-proj", "gru", "rnn_tanh"])
def test_backward_consumes_other_backends_forward(cell, proj, path, fwd, bwd):
    args64 = make_layer_args(cell, 5, 3, 4, 6, proj=_proj_size(6, proj), lengths=[5, 2, 4], device=DEVICE)
    ref_out, ref_grads = run_and_grad(lambda **a: reference.rnn_layer(cell, **a), args64)
    args = cast_args(args64, torch.float32)
    with use_path(path):
        with fusedrnn.use_backend(fwd):
            outs = [o for o in functional.rnn_layer(cell, **args) if o is not None]
        g = torch.Generator().manual_seed(1)  # run_and_grad's cotangents
        loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
                   for o in outs)
        with fusedrnn.use_backend(bwd):
            grads = torch.autograd.grad(loss, [t for t in args.values() if isinstance(t, torch.Tensor)
                                               and t.is_floating_point()])
    names = [n for n, t in args.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    for n, gr in zip(names, grads):
        assert_close_to_reference(f"grad {n}", gr, ref_grads[n])


# ---------------------------------------------------------------------------------------------------------
# Inputs untouched, outputs fresh, non-contiguous input
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inputs_are_not_modified(cell, path):
    a = make_layer_args(cell, 4, 2, 3, 5, dtype=torch.float32, lengths=[4, 2], device=DEVICE)
    with fusedrnn.use_backend("triton"), use_path(path):
        check_inputs_not_modified(cell, a, contextlib.nullcontext())


@pytest.mark.parametrize("path", PATHS)
def test_op_check(path):
    """torch.library.opcheck on the triton backend: schema, no aliasing of inputs/outputs, fake kernel."""
    a = make_layer_args("lstm", 3, 2, 3, 4, proj=2, dtype=torch.float32, lengths=[3, 1], device=DEVICE)
    op_args = ("lstm", a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"],
               a["lengths"], True, True)
    with fusedrnn.use_backend("triton"), use_path(path):
        torch.library.opcheck(torch.ops.fusedrnn.rnn_layer.default, op_args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_noncontiguous_input():
    a = make_layer_args("gru", 5, 3, 4, 6, dtype=torch.float32, device=DEVICE)
    ref_out, ref_grads = run_and_grad(lambda **k: reference.rnn_layer("gru", **k), a)
    b = dict(a)
    b["x"] = a["x"].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # batch_first view
    assert not b["x"].is_contiguous()
    with fusedrnn.use_backend("triton"):
        out, grads = run_and_grad(lambda **k: functional.rnn_layer("gru", **k), b)
    assert_close_to_reference("y", out[0], ref_out[0])
    for n in grads:
        assert_close_to_reference(f"grad {n}", grads[n], ref_grads[n])


# ---------------------------------------------------------------------------------------------------------
# Path choice and refusals
# ---------------------------------------------------------------------------------------------------------
def _call(cell="lstm", H=7, dtype=torch.float32, proj=0, B=3):
    a = make_layer_args(cell, 2, B, 3, H, proj=proj, dtype=dtype, requires_grad=False, device=DEVICE)
    return LayerCall(cell, a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"], None,
                     False)


def test_availability_on_cpu():
    tb = BACKENDS["triton"]
    assert tb.unavailable_reason(torch.device("meta")) is not None
    if DEVICE == "cpu":
        assert tb.unavailable_reason(torch.device("cpu")) is None  # the interpreter
        # ... but "auto" never picks the interpreter
        assert "triton" not in fusedrnn.backends.PREFERENCE["cpu"]
        assert select_backend(_call()).name != "triton"


def test_fp64_is_refused_with_a_reason():
    why = BACKENDS["triton"].unsupported_reason(_call(dtype=torch.float64))
    assert why is not None and "float64" in why
    a = make_layer_args("gru", 2, 2, 3, 4, device=DEVICE)
    with fusedrnn.use_backend("triton"), pytest.raises(BackendUnsupportedError, match="float64"):
        functional.rnn_layer("gru", **a)
    with fusedrnn.use_backend("auto"):  # falls back
        functional.rnn_layer("gru", **a)


def test_auto_path_choice():
    assert plan(_call(H=7))[0] == "persistent"
    assert plan(_call(H=7, proj=3))[0] == "persistent"
    big = _call(H=300, dtype=torch.float16)
    path, _, why = plan(big)
    if interpreting_triton():
        assert (path, why) == ("alternating", None)  # the barrier variant is never chosen there
    else:
        assert path in ("barrier", "alternating")


def test_forced_paths_and_their_refusals(monkeypatch):
    tb = BACKENDS["triton"]
    with use_path("alternating"):
        assert plan(_call(H=7))[0] == "alternating"
        assert tb.unsupported_reason(_call("rnn_tanh", H=2000)) is None  # any size
    with use_path("persistent"):
        why = tb.unsupported_reason(_call(H=300, dtype=torch.float16))
        assert why is not None and "budget" in why
    with use_path("barrier"):
        why = tb.unsupported_reason(_call(H=300, dtype=torch.float16))
        assert why is not None
        if interpreting_triton():
            assert "interpreter" in why
        why = tb.unsupported_reason(_call(H=300, dtype=torch.float16, proj=5))
        assert why is not None
    monkeypatch.setenv("FUSEDRNN_TRITON_PATH", "alternating")
    assert plan(_call())[0] == "alternating"
    monkeypatch.setenv("FUSEDRNN_TRITON_PATH", "bogus")
    assert "bogus" in tb.unsupported_reason(_call())
    with pytest.raises(ValueError, match="bogus"):
        with use_path("bogus"):
            pass


def test_autotune_wiring():
    """What only a GPU exercises (the interpreter runs one config, without pruning or resets): the keys and
    reset_to_zero name real arguments, and the pruning drops 4 warps exactly where the static checks need it."""
    from fusedrnn.triton import rnn_persistent as P
    from fusedrnn.triton import rnn_pointwise as PW
    for (stem, _, barrier), tuner in P._TUNED.items():
        names = tuner.fn.arg_names
        assert set(tuner.keys) <= set(names) and "H" in tuner.keys and "T" not in tuner.keys
        assert ("HO" in tuner.keys) == (stem == "lstm")
        assert (tuner.reset_to_zero or []) == (["sync_ptr"] if barrier else [])
        assert set(tuner.reset_to_zero or []) <= set(names)
    for tuner in list(PW._FWD.values()) + list(PW._BWD.values()):
        assert tuner.keys == ["H"] and "t" not in tuner.keys
    prune = P._prune(4)
    w = {"w_hh_ptr": torch.empty(1, dtype=torch.float16)}
    small = prune(P._CONFIGS, w, BLOCK_H=64, BLOCK_HO=64, HAS_PROJ=False)   # 32 KB of weights
    large = prune(P._CONFIGS, w, BLOCK_H=128, BLOCK_HO=128, HAS_PROJ=False)  # 128 KB
    assert [c.num_warps for c in small] == [4, 8] and [c.num_warps for c in large] == [8]
    fp32 = prune(P._CONFIGS, {"w_hh_ptr": torch.empty(1)}, BLOCK_H=64, BLOCK_HO=64, HAS_PROJ=False)
    assert [c.num_warps for c in fp32] == [8]  # tf32x3: 64 KB of fp32 weights count 128


def test_forced_persistent_refusal_falls_back_under_auto(launches):
    a = make_layer_args("rnn_tanh", 2, 2, 3, 300, dtype=torch.float16, device=DEVICE)
    with use_path("persistent"):
        with fusedrnn.use_backend("triton"), pytest.raises(BackendUnsupportedError, match="budget"):
            functional.rnn_layer("rnn_tanh", **a)
        functional.rnn_layer("rnn_tanh", **a)  # auto: another backend
    assert not launches


# ---------------------------------------------------------------------------------------------------------
# Modules and torch.compile
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_module_and_compile_fullgraph(path):
    """A 2-layer bidirectional LSTM with projection on the triton backend: eager equals the reference
    backend, and torch.compile(fullgraph=True, backend="aot_eager") equals eager (the kernels run inside the
    opaque fusedrnn::rnn_layer op)."""
    torch.manual_seed(0)
    m = fusedrnn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=3, batch_first=True, device=DEVICE)
    x = torch.randn(2, 4, 3, device=DEVICE, requires_grad=True)
    lengths = torch.tensor([4, 2])

    def run(fn, backend):
        with fusedrnn.use_backend(backend), use_path(path):
            y, (h, c) = fn(x, lengths=lengths)
            loss = (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum() + h.sum() - c.sum()
            return [y, h, c] + list(torch.autograd.grad(loss, [x] + list(m.parameters())))

    ref = run(m, "reference")
    eager = run(m, "triton")
    with fusedrnn.use_backend("triton"):
        assert set(fusedrnn.explain(m, x, lengths=lengths).backends) == {"triton"}
    torch._dynamo.reset()
    compiled = run(torch.compile(m, fullgraph=True, backend="aot_eager"), "triton")
    for i, (r, e, c) in enumerate(zip(ref, eager, compiled)):
        assert_close_to_reference(f"eager {i}", e, r)
        assert_close_to_reference(f"compiled {i}", c, e)


# ---------------------------------------------------------------------------------------------------------
# GPU: real sizes, every path including the barrier variant (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------------
GPU_SHAPES = [  # cell, T, B, I, H, proj: persistent (H <= 128; RNN <= 256), barrier (LSTM/GRU H <= 256,
    # RNN <= 512, fp16/bf16), alternating beyond; B not a multiple of the batch tile in some
    ("lstm", 64, 16, 256, 128, 0), ("lstm", 32, 61, 256, 256, 0), ("lstm", 32, 16, 512, 1024, 0),
    ("lstm", 32, 24, 128, 128, 64), ("gru", 64, 13, 256, 127, 0), ("gru", 32, 32, 256, 200, 0),
    ("gru", 16, 8, 256, 768, 0), ("rnn_tanh", 64, 16, 128, 256, 0), ("rnn_relu", 32, 9, 64, 500, 0),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"{c}-T{t}-B{b}-I{i}-H{h}" + (f"-P{p}" if p else "")
                                                   for c, t, b, i, h, p in GPU_SHAPES])
@pytest.mark.parametrize("path", ["auto", "persistent", "barrier", "alternating"])
def test_gpu_real_sizes(path, shape, dtype):
    cell, T, B, I, H, proj = shape
    call = _call(cell, H, dtype, proj, B)
    with use_path(path):
        why = BACKENDS["triton"].unsupported_reason(call)
    if why is not None:
        assert path != "auto" and path != "alternating", why
        pytest.skip(why)
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(0)).tolist()
    lengths[0] = T
    for reverse in (False, True):
        check_against_reference(cell, T, B, I, H, dtype, path, proj=bool(proj), reverse=reverse,
                                lengths=lengths if reverse else None)


@pytest.mark.gpu
def test_gpu_auto_paths_where_expected():
    assert plan(_call("lstm", 128, torch.float16, 0, 16))[:2] == ("persistent", None)
    assert plan(_call("lstm", 256, torch.float16, 0, 16))[:2] == ("barrier", 64)
    assert plan(_call("rnn_tanh", 512, torch.bfloat16, 0, 16))[:2] == ("barrier", 128)
    assert plan(_call("lstm", 256, torch.float32, 0, 16))[0] == "alternating"
    assert plan(_call("lstm", 1024, torch.float16, 0, 16))[0] == "alternating"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    too_many = 8 * (sms // 4 + 1)  # batch tiles x 4 slices > SMs
    path, _, _ = plan(_call("lstm", 256, torch.float16, 0, too_many))
    assert path == "alternating"
    with use_path("barrier"):
        assert "resident" in BACKENDS["triton"].unsupported_reason(_call("lstm", 256, torch.float16, 0, too_many))


@pytest.mark.gpu
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gpu_matches_cudnn(cell):
    """Against torch.nn (cuDNN) in fp16 at a cuDNN-persistent size: same outputs within the dtype rule."""
    torch.manual_seed(0)
    mod = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](256, 256, device="cuda", dtype=torch.float16)
    ours = {"lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU}[cell](256, 256, device="cuda", dtype=torch.float16)
    ours.load_state_dict(mod.state_dict())
    x = torch.randn(128, 32, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad(), fusedrnn.use_backend("triton"):
        y, _ = ours(x)
        y_cudnn, _ = mod(x)
        y64, _ = mod.double()(x.double())
    # cuDNN's own fp16 error takes the place of the native reference's
    assert_close_to_reference("y", y, y64, y_cudnn)


# ---------------------------------------------------------------------------------------------------------
# The GPU benchmark script: runs only on a GPU, but its arguments and --list work anywhere
# ---------------------------------------------------------------------------------------------------------
def test_bench_script_arguments(capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_triton.py")
    spec = importlib.util.spec_from_file_location("bench_triton", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--cells", "lstm,gru", "--shape", "10,2,3,4", "--paths", "persistent,barrier"])
    assert (args.cells, args.shapes, args.paths) == (["lstm", "gru"], [(10, 2, 3, 4)], ["persistent", "barrier"])
    assert bench.parse_args([]).shapes == bench.DEFAULT_SHAPES
    for bad in (["--shape", "1,2"], ["--paths", "fast"], ["--cells", "lstm,tcn"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    capsys.readouterr()
    assert bench.main(["--list", "--cells", "gru", "--shape", "5,2,3,4", "--modes", "fwd"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == ("gru T5 B2 I3 H4 float16 fwd: cudnn, triton:auto, triton:persistent, triton:barrier, "
                           "triton:alternating")
    if not torch.cuda.is_available():
        assert bench.main(["--shape", "5,2,3,4"]) == 2
