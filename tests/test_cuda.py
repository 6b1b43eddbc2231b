"""The "cuda" backend against the spec, on a GPU and on the CUDA emulator.

Every kernel test runs twice, parametrized over `target`: "cuda" (CUDA tensors, @pytest.mark.gpu, skipped without
a GPU) and "cuda-emu" (the same kernels and op code built as host C++ and run on CPU tensors by csrc/emu, with the
limits of an H100: same planner, same paths, same tolerances). Each: every cell x dtype x feature (reverse, lengths with a zero
length, no bias, LSTM projection on the alternating path) on each path -- alternating, persistent, cluster
(forced with FUSEDRNN_CUDA_PATH) -- forward and all gradients against the fp64 reference, odd sizes, batches that
need several chunks or clusters, the workspace contract with other backends, the modules and cells against
torch.nn, and the refusals: a forced persistent path on a shape it cannot take raises with its reason, and
falls back under "auto". Tests without a GPU: the backend refuses CPU tensors with a clear reason; path
selection and its environment variable.

Tolerance (tests/helpers.py): fp16/bf16 within 2x the error of the reference run natively at that dtype plus a
few ulp; fp32 fixed on the alternating path, and on the persistent paths (TF32 tensor cores, fp16's 10-bit
mantissa) the fp16 rule.

Emulated sizes: the planner takes multi-CTA grids (H=7: 2 CTAs forward; H=129: 33 forward, 9 backward), batch
groups on the grid (B=9/40/70: 2-9 groups of 8 rows), several chunks per CTA (B=33, H=300: 75 CTAs, chunks of
32 + 1) and multi-CTA clusters (H=129: 2-4 CTAs; B=40/70: 2-3 clusters), asserted by
test_emulated_shapes_take_multi_cta_plans.
The largest cases (test_realistic_sizes, H up to 768: minutes each) are `slow` on the emulator and run only when
asked for (-m slow, or FUSEDRNN_RUN_SLOW=1; tests/conftest.py).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import fusedrnn
from fusedrnn import functional, reference
from fusedrnn.backends import BACKENDS, BackendUnsupportedError, LayerCall, explain, scoped_environ
from fusedrnn.backends import cuda as cuda_backend
from fusedrnn._extension import emulated_cuda_error, has_emulated_cuda
from helpers import (CELLS, assert_close_to_reference, cast_args, check_inputs_not_modified, compare_with_reference,
                     make_layer_args, max_error, run_and_grad, tolerance)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PATHS = ["alternating", "persistent", "cluster"]
CELL_PROJ = [(c, False) for c in CELLS] + [("lstm", True)]
CELL_IDS = [c + ("-proj" if p else "") for c, p in CELL_PROJ]

needs_emu = pytest.mark.skipif(not has_emulated_cuda(), reason=f"emulated CUDA backend not built: {emulated_cuda_error()}")
# The two places the cuda backend's kernels run: a GPU, and the emulator on CPU tensors.
TARGETS = [pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("cuda-emu", marks=needs_emu)]
DEVICE = {"cuda": "cuda", "cuda-emu": "cpu"}
OPS = {"cuda": "cuda_", "cuda-emu": "cuda_emu_"}


@contextlib.contextmanager
def on_cuda(path=None, target="cuda"):
    """Backend `target` ("cuda" or "cuda-emu"; on `path`, else its heuristic). Through the environment, which
    autograd's backward thread sees too (use_backend's context variable it does not)."""
    with scoped_environ({"FUSEDRNN_BACKEND": target, cuda_backend.PATH_ENV: path}), fusedrnn.use_backend(target):
        yield


def capability(target) -> int:
    """Compute capability major of the target (the emulator answers as an H100)."""
    return torch.cuda.get_device_capability()[0] if target == "cuda" else 9


def path_reason(target, call, path, direction):
    return cuda_backend.path_reason(call, path, direction, OPS[target])


@contextlib.contextmanager
def tf32(enabled: bool):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _proj_size(H: int, proj: bool) -> int:
    return max(1, H // 2) if proj and H > 1 else 0


def _call(args: dict, cell: str) -> LayerCall:
    return LayerCall(cell, args["x"], args["h0"], args["c0"], args["w_ih"], args["w_hh"], args["b_ih"],
                     args["b_hh"], args["w_hr"], args["lengths"], args["reverse"])


def check_against_reference(target, cell, T, B, I, H, dtype, path, proj=False, reverse=False, lengths=None,
                            bias=True, seed=0):
    """Forward and every gradient of backend `target` on `path` vs the fp64 spec (see module doc)."""
    args64 = make_layer_args(cell, T, B, I, H, proj=_proj_size(H, proj), bias=bias, reverse=reverse,
                             lengths=lengths, seed=seed, device=DEVICE[target])
    args = cast_args(args64, dtype)
    tensor_cores_fp32 = dtype == torch.float32 and path != "alternating"
    with tf32(tensor_cores_fp32):
        for direction in ("forward", "backward"):
            why = path_reason(target, _call(args, cell), path, direction)
            if why is not None and path == "cluster" and capability(target) < 9:
                pytest.skip(f"cluster path on sm_{capability(target)}0: {why}")
            assert why is None, why

    def run_fast(args):
        with tf32(tensor_cores_fp32), on_cuda(path, target):
            return run_and_grad(lambda **a: functional.rnn_layer(cell, **a), args)

    def close(name, fast, ref, nat):
        if tensor_cores_fp32:  # TF32: the fp16 rule (same mantissa), on the fp32 result
            scale = ref.detach().abs().max().item() if ref.numel() else 1.0
            tol = tolerance(torch.float16, max_error(nat, ref), scale)
            assert max_error(fast, ref) <= tol, f"{name}: error {max_error(fast, ref):.3g} > {tol:.3g} (tf32)"
        else:
            assert_close_to_reference(name, fast, ref, nat)

    compare_with_reference(cell, args64, dtype, run_fast, native=torch.float16 if tensor_cores_fp32 else dtype,
                           close=close)


# ---------------------------------------------------------------------------------------------------------
# No GPU needed
# ---------------------------------------------------------------------------------------------------------
def test_refuses_cpu_tensors_with_a_reason():
    backend = BACKENDS["cuda"]
    assert backend.unavailable_reason(torch.device("cpu")) == "runs on CUDA tensors only, got cpu"
    a = make_layer_args("lstm", 3, 2, 3, 4, dtype=torch.float32, requires_grad=False)
    with fusedrnn.use_backend("cuda"):
        with pytest.raises(BackendUnsupportedError, match=r"backend 'cuda' cannot run lstm .* CUDA tensors only"):
            functional.rnn_layer("lstm", **a)
    with fusedrnn.use_backend("auto"):  # and "auto" on CPU never tries it
        assert "cuda" not in [n for d in explain(lambda: functional.rnn_layer("lstm", **a)) for n, _ in d.refused]


def test_path_environment_variable(monkeypatch):
    monkeypatch.delenv(cuda_backend.PATH_ENV, raising=False)
    assert cuda_backend.forced_path() is None
    for value, expected in [("auto", None), (" Persistent ", "persistent"), ("cluster", "cluster"),
                            ("alternating", "alternating")]:
        monkeypatch.setenv(cuda_backend.PATH_ENV, value)
        assert cuda_backend.forced_path() == expected
    monkeypatch.setenv(cuda_backend.PATH_ENV, "fused")
    with pytest.raises(ValueError, match=r"FUSEDRNN_CUDA_PATH: expected 'auto' or one of .*'fused'"):
        cuda_backend.forced_path()


def test_bench_script_runs_without_a_gpu(capsys, monkeypatch):
    """bench/bench_cuda.py imports and parses its arguments on a CPU machine (it runs on the GPU campaign)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_cuda.py"
    spec = importlib.util.spec_from_file_location("bench_cuda", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_cuda", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    assert bench.main(["--list"]) == 0
    assert "600 cases x 5 providers" in capsys.readouterr().out  # the grid; the cuDNN case is on it
    assert bench.main(["--list", "--cells", "lstm", "--dtypes", "fp16", "--batches", "16", "--hidden", "768",
                       "--seq", "1024"]) == 0
    assert capsys.readouterr().out.split() == ["lstm-fp16-B16-H768-T1024-fwd", "lstm-fp16-B16-H768-T1024-fwdbwd",
                                               "2", "cases", "x", "5", "providers"]
    if not torch.cuda.is_available():
        assert bench.main(["--cells", "gru"]) == 2


def test_heuristic_table():
    def call(T, B):
        a = make_layer_args("lstm", T, B, 2, 4, requires_grad=False)
        return _call(a, "lstm")
    assert cuda_backend.candidate_paths(call(1, 4)) == ("alternating",)  # cells
    assert cuda_backend.candidate_paths(call(2, 4)) == ("alternating",)
    # longer: the latency model's order (tests/test_cuda_latency.py checks the model)
    from fusedrnn.backends import cuda_latency
    if not has_emulated_cuda():
        pytest.skip("the latency model asks the planner of the emulated CUDA backend")
    assert sorted(cuda_backend.candidate_paths(call(64, 16))) == ["alternating", "cluster", "persistent"]
    assert cuda_backend.candidate_paths(call(64, 16)) == cuda_latency.paths_by_model(
        "lstm", 4, 16, 64, torch.float64, "forward")
    half = _call(make_layer_args("lstm", 1024, 256, 2, 768, requires_grad=False, dtype=torch.float16), "lstm")
    assert cuda_backend.candidate_paths(half)[0] == "alternating"  # a large batch: cuBLAS over all SMs


# ---------------------------------------------------------------------------------------------------------
# Every cell x dtype x direction x lengths, on every path; on a GPU and on the emulator
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [None, [5, 1, 3], [2, 5, 0]], ids=["full", "lengths", "lengths-with-0"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("cell,proj", CELL_PROJ, ids=CELL_IDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("target", TARGETS)
def test_layer_matches_reference(target, path, cell, proj, dtype, reverse, lengths):
    if proj and path != "alternating":
        pytest.skip("the projection runs on the alternating path only (refusal tested below)")
    check_against_reference(target, cell, T=5, B=3, I=4, H=7, dtype=dtype, path=path, proj=proj, reverse=reverse,
                            lengths=lengths)


SHAPES = {  # T, B, I, H, bias
    "T1-B1-I1-H1": (1, 1, 1, 1, True),
    "T3-B1-I2-H16-nobias": (3, 1, 2, 16, False),
    "T4-B3-I3-H63": (4, 3, 3, 63, True),
    "T6-B9-I5-H129": (6, 9, 5, 129, True),     # grids of 2 x 33 (forward) and 2 x 9 CTAs; clusters of 2-4 CTAs
    "T5-B40-I8-H64": (5, 40, 8, 64, True),     # 5 batch groups (grid) / two clusters
    "T7-B70-I6-H33": (7, 70, 6, 33, True),     # 9 batch groups / three clusters, a partial last one
}


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("cell,proj", CELL_PROJ, ids=CELL_IDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("target", TARGETS)
def test_odd_shapes(target, path, cell, proj, shape, dtype):
    if proj and path != "alternating":
        pytest.skip("the projection runs on the alternating path only")
    T, B, I, H, bias = SHAPES[shape]
    lengths = [T] + [max(0, T - 2 - b % T) for b in range(B - 1)]
    check_against_reference(target, cell, T, B, I, H, dtype, path, proj=proj, bias=bias, lengths=lengths,
                            reverse=H % 2 == 1)


def _realistic_targets():  # the emulator takes ~10 s to minutes per case here: slow there
    return [pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("cuda-emu", marks=[needs_emu, pytest.mark.slow])]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B,H", [(16, 256), (8, 512), (3, 768)], ids=["B16-H256", "B8-H512", "B3-H768"])
@pytest.mark.parametrize("target", _realistic_targets())
def test_realistic_sizes(target, path, cell, dtype, B, H):
    """Sizes where the persistent kernels spread over many CTAs (several m-tiles, split K, clusters of 8-16)."""
    if path == "cluster" and (H, cell) in ((768, "lstm"), (768, "gru")):
        pytest.skip("W_hh does not fit one cluster (refusal tested below)")
    check_against_reference(target, cell, T=12, B=B, I=32, H=H, dtype=dtype, path=path,
                            lengths=[12, 7, 1] + [12] * (B - 3), reverse=cell == "gru")


# What the emulated sizes above exercise, per the planner with an H100's limits (the same plan the GPU gets).
PLAN_FIELDS = ("ctas", "groups", "units", "m_tiles", "warps_m", "warps_k", "k_padded", "chunk", "smem_bytes",
               "group_rows")


@needs_emu
def test_emulated_shapes_take_multi_cta_plans():
    plan = torch.ops.fusedrnn.cuda_emu_rnn_persistent_plan
    h100 = [132, 227 * 1024, 9]

    def fields(path, direction, cell, dtype, B, H):
        why, values = plan(path, direction, cell, dtype, B, H, h100)
        assert why == "", why
        return dict(zip(PLAN_FIELDS, values))

    for dtype in DTYPES.values():
        assert fields("persistent", "forward", "lstm", dtype, 3, 7)["ctas"] == 2  # test_layer_matches_reference
        for direction in ("forward", "backward"):
            assert fields("persistent", direction, "lstm", dtype, 9, 129)["ctas"] >= 8
            assert fields("cluster", direction, "lstm", dtype, 9, 129)["ctas"] >= 2  # a multi-CTA cluster
            assert fields("cluster", direction, "gru", dtype, 9, 129)["ctas"] >= 2
            assert fields("cluster", direction, "lstm", dtype, 40, 64)["groups"] >= 2  # several clusters
            assert fields("cluster", direction, "rnn_tanh", dtype, 70, 33)["groups"] == 3
        assert fields("persistent", "forward", "gru", dtype, 70, 33)["groups"] == 9  # test_odd_shapes
        for direction in ("forward", "backward"):
            assert fields("persistent", direction, "lstm", dtype, 9, 129)["groups"] == 2
        chunks = fields("persistent", "forward", "lstm", dtype, 33, 300)  # test_grid_chunks_and_groups
        assert chunks["groups"] == 1 and chunks["chunk"] < chunks["group_rows"] == 33
        assert fields("persistent", "backward", "lstm", dtype, 33, 300)["groups"] == 5

    # Both stagings of the grid exchange run here. The kernel stages each producer's slice as its flag arrives
    # where a CTA's units are whole 16-byte pieces (rnn_persistent.cu: slices_stageable), else all rows after
    # the last flag: rows for the fp16 forward of test_odd_shapes' H=129 (4 units x 2 bytes), slices for its
    # fp32 forward and every backward (units a multiple of 16); slices with a second chunk staged by rows in
    # test_grid_chunks_and_groups' fp32 forward.
    def piece_bytes(direction, dtype, B, H):
        return fields("persistent", direction, "lstm", dtype, B, H)["units"] * (4 if dtype == torch.float32 else 2)
    assert piece_bytes("forward", torch.float16, 9, 129) % 16 != 0
    assert piece_bytes("forward", torch.float32, 9, 129) % 16 == 0
    assert piece_bytes("forward", torch.float32, 33, 300) % 16 == 0
    for dtype in DTYPES.values():
        assert piece_bytes("backward", dtype, 9, 129) % 16 == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("target", TARGETS)
def test_grid_chunks_and_groups(target, cell, dtype):
    """The grid exchange with several chunks per CTA (forward: 75 CTAs, one group of 33 rows in chunks of 32 + 1)
    and several batch groups (backward: 5 groups of 8 rows on 19 CTAs each)."""
    T, B, H = 3, 33, 300
    check_against_reference(target, cell, T, B, 4, H, dtype, "persistent", lengths=[T, 1] + [T - b % T for b in range(B - 2)])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("target", TARGETS)
def test_empty_batch(target, cell):
    a = make_layer_args(cell, 3, 0, 4, 5, dtype=torch.float16, device=DEVICE[target])
    with on_cuda(target=target):
        out, grads = run_and_grad(lambda **k: functional.rnn_layer(cell, **k), a)
    assert out[0].shape == (3, 0, 5)
    for name, g in grads.items():
        assert g.shape == a[name].shape and not g.any(), name


# ---------------------------------------------------------------------------------------------------------
# The workspace contract: any backward consumes any forward
# ---------------------------------------------------------------------------------------------------------
def _op(cell, a, need_workspace=True):
    return torch.ops.fusedrnn.rnn_layer(cell, a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                                        a["w_hr"], a["lengths"], a["reverse"], need_workspace)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell,proj", CELL_PROJ, ids=CELL_IDS)
@pytest.mark.parametrize("target", TARGETS)
def test_workspace_layout_equals_reference(target, cell, proj, path):
    """fp32 against the reference backend's fp32; the persistent paths run TF32, so the fp16 ulp floor."""
    if proj and path != "alternating":
        pytest.skip("the projection runs on the alternating path only")
    if path == "cluster" and capability(target) < 9:
        pytest.skip("clusters need sm_90")
    device = DEVICE[target]
    a = make_layer_args(cell, 4, 3, 3, 5, proj=_proj_size(5, proj), dtype=torch.float32, lengths=[4, 1, 3],
                        reverse=True, requires_grad=False, device=device)
    with fusedrnn.use_backend("reference"):
        ref = _op(cell, a)
    with on_cuda(path, target), tf32(path != "alternating"):
        out = _op(cell, a)
        inference = _op(cell, a, need_workspace=False)
    valid = (torch.arange(4, device=device)[:, None] < a["lengths"][None, :])[..., None]

    def close(name, fast, r):
        if path == "alternating":
            assert_close_to_reference(name, fast, r)
        else:  # (c_n and the RNN workspace are empty for some cells)
            tol = tolerance(torch.float16, 0.0, r.abs().max().item() if r.numel() else 1.0)
            assert max_error(fast, r) <= tol, f"{name}: error {max_error(fast, r):.3g} > {tol:.3g} (tf32)"

    for name, o, r in zip(["y", "h_n", "c_n"], out, ref):
        close(name, o, r)
    assert out[3].shape == ref[3].shape
    close("workspace (valid rows)", torch.where(valid, out[3], 0), torch.where(valid, ref[3], 0))
    assert inference[3].numel() == 0
    for name, o, r in zip(["y", "h_n", "c_n"], inference, out):
        assert torch.equal(o, r), name


@pytest.mark.parametrize("fwd,bwd", [("cuda", "reference"), ("reference", "cuda")])
@pytest.mark.parametrize("path", ["alternating", "persistent"])
@pytest.mark.parametrize("cell,proj", [("lstm", True), ("lstm", False), ("gru", False), ("rnn_tanh", False)],
                         ids=["lstm-proj", "lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("target", TARGETS)
def test_backward_consumes_other_backends_forward(target, cell, proj, path, fwd, bwd):
    if proj and path != "alternating":
        pytest.skip("the projection runs on the alternating path only")
    fwd, bwd = (target if b == "cuda" else b for b in (fwd, bwd))
    args64 = make_layer_args(cell, 5, 3, 4, 6, proj=_proj_size(6, proj), lengths=[5, 2, 4], device=DEVICE[target])
    ref_out, ref_grads = run_and_grad(lambda **a: reference.rnn_layer(cell, **a), args64)
    args = cast_args(args64, torch.bfloat16)
    native_out, native_grads = run_and_grad(
        lambda **a: reference.rnn_layer(cell, **a, compute_dtype=torch.bfloat16), cast_args(args64, torch.bfloat16))
    with on_cuda(path, target):
        with fusedrnn.use_backend(fwd):
            os.environ["FUSEDRNN_BACKEND"] = fwd
            outs = [o for o in functional.rnn_layer(cell, **args) if o is not None]
        g = torch.Generator().manual_seed(1)  # run_and_grad's cotangents
        loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
                   for o in outs)
        os.environ["FUSEDRNN_BACKEND"] = bwd
        with fusedrnn.use_backend(bwd):
            names = [n for n, t in args.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
            grads = torch.autograd.grad(loss, [args[n] for n in names])
    for n, gr in zip(names, grads):
        assert_close_to_reference(f"grad {n}", gr, ref_grads[n], native_grads[n])


# ---------------------------------------------------------------------------------------------------------
# Inputs untouched, op contract, modules
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["alternating", "persistent"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("target", TARGETS)
def test_inputs_are_not_modified(target, cell, path):
    a = make_layer_args(cell, 4, 2, 3, 5, dtype=torch.float16, lengths=[4, 2], device=DEVICE[target])
    check_inputs_not_modified(cell, a, on_cuda(path, target))


@pytest.mark.parametrize("path", ["alternating", "persistent"])
@pytest.mark.parametrize("target", TARGETS)
def test_op_check(target, path):
    a = make_layer_args("lstm", 3, 2, 3, 4, proj=2 if path == "alternating" else 0, dtype=torch.float16,
                        lengths=[3, 1], device=DEVICE[target])
    op_args = ("lstm", a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"],
               a["lengths"], True, True)
    with on_cuda(path, target):
        torch.library.opcheck(torch.ops.fusedrnn.rnn_layer.default, op_args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.fixture
def cudnn_without_tf32():
    """cuDNN in full fp32 for the comparison. Through flags(): a plain assignment raises once
    torch.testing._internal (test_conformance imports it) has called torch.backends.disable_global_flags()."""
    c = torch.backends.cudnn
    with c.flags(enabled=c.enabled, benchmark=c.benchmark, deterministic=c.deterministic, allow_tf32=False):
        yield


@pytest.mark.parametrize("path", [None, "alternating"], ids=["auto", "alternating"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("target", TARGETS)
def test_modules_match_torch_nn(target, kind, path, cudnn_without_tf32):
    """Two layers, bidirectional, packed sequences, fp32, against torch.nn (cuDNN) with the same weights."""
    device = DEVICE[target]
    ref = getattr(torch.nn, kind)(6, 12, num_layers=2, bidirectional=True, batch_first=True).to(device)
    mine = getattr(fusedrnn, kind)(6, 12, num_layers=2, bidirectional=True, batch_first=True).to(device)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(4, 9, 6, device=device)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [9, 7, 3, 1], batch_first=True)
    with on_cuda(path, target):
        y, h = mine(packed)
    y_ref, h_ref = ref(packed)
    assert max_error(y.data, y_ref.data) < 1e-4
    for a, b in zip(h if kind == "LSTM" else [h], h_ref if kind == "LSTM" else [h_ref]):
        assert max_error(a, b) < 1e-4


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("target", TARGETS)
def test_cells_match_torch_nn(target, kind):
    device = DEVICE[target]
    ref = getattr(torch.nn, kind)(5, 7).to(device)
    mine = getattr(fusedrnn, kind)(5, 7).to(device)
    mine.load_state_dict(ref.state_dict())
    x, h = torch.randn(3, 5, device=device), torch.randn(3, 7, device=device)
    hx = (h, torch.randn(3, 7, device=device)) if kind == "LSTMCell" else h
    with on_cuda(target=target):
        out = mine(x, hx)
    out_ref = ref(x, hx)
    for a, b in zip(out if kind == "LSTMCell" else [out], out_ref if kind == "LSTMCell" else [out_ref]):
        assert max_error(a, b) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# Path choice, refusals and fallback
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_forced_persistent_on_impossible_shape_raises_and_auto_falls_back(target):
    # W_hh of an fp16 LSTM with H=4096 is 128 MB: no share of it fits one SM's shared memory.
    a = make_layer_args("lstm", 3, 2, 8, 4096, dtype=torch.float16, requires_grad=False, device=DEVICE[target])
    with on_cuda("persistent", target):
        with pytest.raises(BackendUnsupportedError,
                           match=r"FUSEDRNN_CUDA_PATH=persistent: the persistent forward kernel needs .* shared memory"):
            functional.rnn_layer("lstm", **a)
        with fusedrnn.use_backend("auto"):
            decisions = explain(lambda: functional.rnn_layer("lstm", **a))
    assert decisions.backends[0] != target
    if target == "cuda":  # "auto" never tries cuda-emu (CPU list: cpu, reference)
        refused = dict(decisions[0].refused)
        assert "shared memory" in refused["cuda"]
    with on_cuda(target=target):  # the heuristic takes the alternating path instead
        assert BACKENDS[target].choose_path(_call(a, "lstm"), "forward") == "alternating"
        y, _, _ = functional.rnn_layer("lstm", **a)
    assert y.shape == (3, 2, 4096)


@pytest.mark.parametrize("target", TARGETS)
def test_persistent_refusals_name_their_reason(target):
    device = DEVICE[target]
    a = make_layer_args("lstm", 3, 2, 4, 8, proj=4, dtype=torch.float16, requires_grad=False, device=device)
    assert "projection" in path_reason(target, _call(a, "lstm"), "persistent", "forward")
    b = make_layer_args("gru", 3, 2, 4, 8, dtype=torch.float32, requires_grad=False, device=device)
    with tf32(False):
        assert "allow_tf32" in path_reason(target, _call(b, "gru"), "persistent", "backward")
    with tf32(True):
        assert path_reason(target, _call(b, "gru"), "persistent", "backward") is None
    c = make_layer_args("lstm", 3, 2, 4, 768, dtype=torch.float16, requires_grad=False, device=device)
    cluster_reason = path_reason(target, _call(c, "lstm"), "cluster", "forward")
    if capability(target) < 9:
        assert "sm_90" in cluster_reason
    else:  # 4.5 MB of W_hh over at most 16 CTAs of 227 KB
        assert "shared memory" in cluster_reason
        # 9 batch groups of 32 rows, each a 16-CTA cluster (2 MB of W_hh): more clusters than can run at once (H100:
        # at most 8 of 16 CTAs; the emulator answers 132 // 16), so not planned as if they could.
        d = make_layer_args("lstm", 2, 288, 4, 512, dtype=torch.float16, requires_grad=False, device=device)
        assert "clusters of 16 CTAs" in path_reason(target, _call(d, "lstm"), "cluster", "forward")


@pytest.mark.parametrize("target", TARGETS)
def test_heuristic_picks_a_persistent_path_for_the_cudnn_case(target):
    # fp16 LSTM H=768 B=16: the case where cuDNN runs its persistent kernel.
    a = make_layer_args("lstm", 64, 16, 768, 768, dtype=torch.float16, requires_grad=False, device=DEVICE[target])
    with on_cuda(target=target):
        assert BACKENDS[target].choose_path(_call(a, "lstm"), "forward") == "persistent"


# ---------------------------------------------------------------------------------------------------------
# The emulator itself: the backend is reachable only when named, and bad input raises
# ---------------------------------------------------------------------------------------------------------
@needs_emu
def test_emulated_backend_only_when_named():
    a = make_layer_args("gru", 4, 2, 3, 5, dtype=torch.float32, requires_grad=False)
    with fusedrnn.use_backend("auto"):
        chosen = explain(lambda: functional.rnn_layer("gru", **a)).backends
    assert len(chosen) == 1 and chosen[0] in fusedrnn.backends.PREFERENCE["cpu"]
    assert "cuda-emu" in fusedrnn.available_backends("cpu")
    assert "cuda-emu" not in fusedrnn.backends.PREFERENCE["cpu"]
    with on_cuda(target="cuda-emu"):
        assert explain(lambda: functional.rnn_layer("gru", **a)).backends == ["cuda-emu"]
    assert BACKENDS["cuda-emu"].unavailable_reason(torch.device("meta")).startswith("runs on CPU tensors only")


@needs_emu
def test_emulated_op_rejects_bad_input():
    a = make_layer_args("lstm", 3, 2, 3, 4, dtype=torch.float64, requires_grad=False)
    with pytest.raises(RuntimeError, match="dtype Double not supported"):
        torch.ops.fusedrnn.cuda_emu_rnn_layer("lstm", a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
                                              a["b_hh"], None, None, False, True, "alternating")
    b = cast_args(a, torch.float16, requires_grad=False)
    with pytest.raises(RuntimeError, match="path must be one of alternating, persistent, cluster, got 'fused'"):
        torch.ops.fusedrnn.cuda_emu_rnn_layer("lstm", b["x"], b["h0"], b["c0"], b["w_ih"], b["w_hh"], b["b_ih"],
                                              b["b_hh"], None, None, False, True, "fused")
    with pytest.raises(RuntimeError, match="must be CPU tensors .backend cuda-emu. of x's dtype"):
        torch.ops.fusedrnn.cuda_emu_rnn_layer("lstm", b["x"], b["h0"], b["c0"].float(), b["w_ih"], b["w_hh"],
                                              b["b_ih"], b["b_hh"], None, None, False, True, "alternating")
    with pytest.raises(RuntimeError, match="lengths must be an int64 tensor"):
        torch.ops.fusedrnn.cuda_emu_rnn_layer("lstm", b["x"], b["h0"], b["c0"], b["w_ih"], b["w_hh"], b["b_ih"],
                                              b["b_hh"], None, torch.tensor([3, 1], dtype=torch.int32), False, True,
                                              "persistent")
