"""fusedrnn::beam_topk: every implementation against the spec (fusedrnn.reference_decoding).

Tokens and parents must equal the reference exactly (same dtype in, same fp32 arithmetic up to the row's
log-sum-exp, so only cross-row near-ties within ~1 ulp could legitimately differ -- the data below has
exact ties, which every implementation must break the same way, and no near-ties). Scores are compared
with the fp64 reference of the same (upcast) logits at the suite's fp32 tolerance: the kernels compute in
fp32 whatever the logits dtype.
"""
from __future__ import annotations

import math

import pytest
import torch

import fusedrnn
from fusedrnn import ops
from fusedrnn.reference_decoding import beam_topk_reference

from fusedrnn._extension import emulated_cuda_error
from helpers import FULL_PRECISION_TOL, interpreting_triton

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run_impl(name, x, b, k, K, **kw):
    if name == "reference":
        return beam_topk_reference(x, b, k, K)
    if name == "cpu":
        if not hasattr(torch.ops.fusedrnn, "cpu_beam_topk"):
            pytest.skip(f"C++ extension not built: {fusedrnn.extension_error()}")
        return torch.ops.fusedrnn.cpu_beam_topk(x, b, k, K)
    if name == "triton":
        if x.device.type == "cpu" and not interpreting_triton():
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
        from fusedrnn.triton.beam_topk import beam_topk_triton
        return beam_topk_triton(x, b, k, K, **kw)
    if name == "cuda":
        return torch.ops.fusedrnn.cuda_beam_topk(x, b, k, K)
    if name == "cuda-emu":  # the CUDA kernels on CPU tensors (csrc/emu)
        if not hasattr(torch.ops.fusedrnn, "cuda_emu_beam_topk"):
            pytest.skip(f"emulated CUDA backend not built: {emulated_cuda_error()}")
        return torch.ops.fusedrnn.cuda_emu_beam_topk(x, b, k, K)
    raise ValueError(name)


def make_case(B, K, V, dtype, seed, neg_inf=0.2, dead_row=True, dup_row=True, dead_beam=True, device="cpu"):
    """Logits on a 1/4 grid in [-4, 4) (many exact ties inside a row), some -inf, one all -inf row, one row
    duplicated with its beam score (a cross-row exact tie), dead (-inf) beams; beam scores continuous,
    so distinct rows never nearly tie."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-16, 16, (B * K, V), generator=g).double() / 4
    x[torch.rand(B * K, V, generator=g) < neg_inf] = -math.inf
    b = -3 * torch.rand(B * K, generator=g, dtype=torch.float64)
    if dead_row:
        x[B * K - 1] = -math.inf
    if dup_row and K > 1:
        x[1], b[1] = x[0], b[0]
    if dead_beam and K > 2:
        b[2::K] = -math.inf
    return x.to(dtype).to(device), b.float().to(device)


def assert_matches(name, got, x, b, k, K):
    scores, tokens, parents = got
    rs, rt, rp = beam_topk_reference(x, b, k, K)  # same dtype in: the tie decisions to match
    r64, _, _ = beam_topk_reference(x.double(), b.double(), k, K)
    assert scores.dtype == torch.float32 and tokens.dtype == parents.dtype == torch.int64
    assert torch.equal(tokens.cpu(), rt), f"{name}: tokens\n{tokens}\n!= reference\n{rt}"
    assert torch.equal(parents.cpu(), rp), f"{name}: parents\n{parents}\n!= reference\n{rp}"
    s, r = scores.double().cpu(), r64
    assert torch.equal(torch.isnan(s), torch.isnan(r)) and torch.equal(torch.isinf(s), torch.isinf(r))
    assert torch.equal(s[torch.isinf(s)], r[torch.isinf(r)])
    fin = torch.isfinite(r)
    if fin.any():
        scale = max(1.0, r[fin].abs().max().item())
        err = (s[fin] - r[fin]).abs().max().item()
        assert err <= FULL_PRECISION_TOL[torch.float32] * scale, f"{name}: score error {err:.3g}"


CASES = [  # B, K, V, k
    (1, 1, 1, 1), (1, 1, 17, 5), (2, 3, 64, 6), (3, 4, 257, 8), (2, 5, 1000, 10), (1, 8, 2048, 16),
    (2, 2, 300, 64), (1, 4, 40, 100),  # k > V (each row gives all V), k <= K*V
]


def case_id(c):
    return "B{}-K{}-V{}-k{}".format(*c)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("impl", ["reference", "cpu", "cuda-emu"])
def test_matches_reference(impl, dtype, case):
    B, K, V, k = case
    x, b = make_case(B, K, V, DTYPES[dtype], seed=hash(case) % 1000)
    assert_matches(impl, run_impl(impl, x, b, k, K), x, b, k, K)


TRITON_CASES = [(1, 1, 17, 5), (2, 3, 64, 6), (2, 4, 257, 8), (1, 4, 40, 100), (2, 2, 300, 64)]


@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_triton_matches_reference(dtype, case):
    B, K, V, k = case
    x, b = make_case(B, K, V, DTYPES[dtype], seed=hash(case) % 1000)
    assert_matches("triton", run_impl("triton", x, b, k, K), x, b, k, K)


@pytest.mark.parametrize("splits,block,V", [(3, 64, 600), (5, 128, 1500)], ids=["S3-BLOCK64-V600", "S5-BLOCK128-V1500"])
def test_triton_vocab_splits(splits, block, V):
    """The multi-split (several programs per row) and multi-block paths, at interpreter-sized V."""
    B, K, k = 2, 3, 20
    x, b = make_case(B, K, V, torch.float32, seed=splits)
    assert_matches("triton", run_impl("triton", x, b, k, K, num_splits=splits, block=block), x, b, k, K)


def test_triton_k128_multiblock():
    x, b = make_case(1, 2, 700, torch.float16, seed=7)
    assert_matches("triton", run_impl("triton", x, b, 128, 2, num_splits=2, block=128), x, b, 128, 2)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_cpu_large_vocab(impl):
    """V = 256k, k = 64 (2 x beam 32)."""
    B, K, V, k = 2, 4, 256 * 1024, 64
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B * K, V, generator=g)
    b = -torch.rand(B * K, generator=g) * 5
    assert_matches(impl, run_impl(impl, x, b, k, K), x, b, k, K)


IMPLS = ["reference", "cpu", "triton", "cuda-emu"]


@pytest.mark.parametrize("impl", IMPLS)
def test_lowest_index_wins(impl):
    """Equal scores: the lowest flattened index beam*V + token first -- so on identical beams all of beam 0's
    tied tokens come before beam 1's."""
    K, V = 3, 10
    x = torch.zeros(K, V)
    x[:, 7] = 1.0
    b = torch.tensor([-1.0, -1.0, -5.0])
    scores, tokens, parents = run_impl(impl, x, b, 6, K)
    assert tokens.tolist() == [[7, 7, 0, 1, 2, 3]]
    assert parents.tolist() == [[0, 1, 0, 0, 0, 0]]


@pytest.mark.parametrize("impl", IMPLS)
def test_rounding_tie_prefers_larger_logit(impl):
    """Rule 3: two different logits of one row whose fp32 scores round equal -- the larger logit (token 1
    here) ranks first although token 0 has the lower index; a per-row top-k on raw logits relies on it."""
    V = 64
    x = torch.full((1, V), 0.5)
    x[0, 0] = 1.0
    x[0, 1] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    b = torch.tensor([-1000.0])  # ulp(1000) = 6e-5 swallows the 1.2e-7 difference
    scores, tokens, _ = run_impl(impl, x, b, 2, 1)
    assert scores[0, 0] == scores[0, 1], "premise: the two scores round to the same fp32 value"
    assert tokens.tolist() == [[1, 0]]


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_and_posinf_poison_the_row(impl):
    K, V = 3, 20
    x = torch.randn(2 * K, V)
    x[1, 5] = math.nan       # item 0, beam 1
    x[3, 2] = math.inf       # item 1, beam 0
    b = torch.zeros(2 * K)
    b[5] = math.nan          # item 1, beam 2
    scores, tokens, parents = run_impl(impl, x, b, 5, K)
    # item 0: beam 1's tokens 0..4, all NaN, rank first
    assert parents[0].tolist() == [1] * 5 and tokens[0].tolist() == [0, 1, 2, 3, 4]
    assert torch.isnan(scores[0]).all()
    # item 1: beam 0 then beam 2 (both poisoned), lowest beam first
    assert parents[1].tolist() == [0, 0, 0, 0, 0] and tokens[1].tolist() == [0, 1, 2, 3, 4]
    x[3, 2] = 0.0
    scores, tokens, parents = run_impl(impl, x, b, 5, K)
    assert parents[1].tolist() == [2] * 5 and torch.isnan(scores[1]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_neg_inf_rows_and_beams(impl):
    """All -inf rows and -inf beam scores: -inf candidates (never NaN), ranked after every finite one."""
    K, V = 4, 6
    x = torch.randn(K, V)
    x[0] = -math.inf
    x[1, :4] = -math.inf
    b = torch.tensor([0.0, 0.0, -math.inf, -math.inf])
    scores, tokens, parents = run_impl(impl, x, b, 10, K)
    assert not torch.isnan(scores).any()
    assert parents[0, :2].tolist() == [1, 1] and sorted(tokens[0, :2].tolist()) == [4, 5]
    assert torch.isfinite(scores[0, :2]).all() and (scores[0, 2:] == -math.inf).all()
    # the -inf ones, by (beam asc, logit desc, token asc): beam 0 tokens 0..5, then beam 1's -inf tokens
    assert parents[0, 2:].tolist() == [0] * 6 + [1, 1] and tokens[0, 2:].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]


@pytest.mark.parametrize("impl", IMPLS)
def test_single_beam_is_log_softmax_topk(impl):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 500, generator=g)
    scores, tokens, parents = run_impl(impl, x, torch.zeros(3), 7, 1)
    expect = torch.log_softmax(x.double(), -1).topk(7)
    assert torch.equal(tokens, expect.indices) and (parents == 0).all()
    assert (scores.double() - expect.values).abs().max() < 1e-6


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_row_stride(impl):
    """Rows need not be contiguous with each other (e.g. the last step of [N, T, V] logits)."""
    x, b = make_case(2, 3, 100, torch.float32, seed=11)
    wide = torch.full((6, 160), 123.0)
    wide[:, :100] = x
    view = wide[:, :100]
    assert view.stride(0) == 160
    assert_matches(impl, run_impl(impl, view, b, 9, 3), x, b, 9, 3)


# --- the op: validation, dispatch, torch.library ------------------------------------------------------
def test_op_validation():
    x = torch.randn(6, 5)
    with pytest.raises(ValueError, match="k=16"):
        ops.beam_topk(x, torch.zeros(6), 16, 3)           # 16 > K*V = 15
    assert ops.beam_topk(x, torch.zeros(6), 15, 3)[0].shape == (2, 15)
    with pytest.raises(ValueError, match="multiple of num_beams"):
        ops.beam_topk(x, torch.zeros(6), 2, 4)
    with pytest.raises(ValueError, match="give num_beams"):
        ops.beam_topk(x, torch.zeros(6), 2)
    with pytest.raises(ValueError, match="elements"):
        ops.beam_topk(x, torch.zeros(5), 2, 3)
    with pytest.raises(ValueError, match="float"):
        ops.beam_topk(x.long(), torch.zeros(6), 2, 3)
    # 2-D beam scores carry K
    s1 = ops.beam_topk(x, torch.zeros(2, 3), 4)
    s2 = ops.beam_topk(x, torch.zeros(6), 4, 3)
    assert all(torch.equal(a, c) for a, c in zip(s1, s2))


def test_op_dispatch():
    x = torch.randn(4, 50)
    b = torch.zeros(4)
    expect = "cpu" if hasattr(torch.ops.fusedrnn, "cpu_beam_topk") else "reference"
    with fusedrnn.use_backend("auto"):
        assert ops.beam_topk_backend(x, 8) == expect
    with fusedrnn.use_backend("reference"):
        assert ops.beam_topk_backend(x, 8) == "reference"
    with fusedrnn.use_backend("cuda"), pytest.raises(fusedrnn.BackendUnsupportedError, match="CUDA tensors"):
        ops.beam_topk(x, b, 8, 2)
    if interpreting_triton():
        with fusedrnn.use_backend("triton"):
            assert ops.beam_topk_backend(x, 8) == "triton"
            got = ops.beam_topk(x, b, 8, 2)
        assert_matches("triton via op", got, x, b, 8, 2)
        with fusedrnn.use_backend("triton"), pytest.raises(fusedrnn.BackendUnsupportedError, match="k <= 128"):
            ops.beam_topk(torch.randn(4, 200), b, 129, 2)
    with fusedrnn.use_backend("triton"), pytest.raises(fusedrnn.BackendUnsupportedError, match="float64"):
        ops.beam_topk(x.double(), b, 8, 2)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_op_float64(backend):
    if backend == "cpu" and not hasattr(torch.ops.fusedrnn, "cpu_beam_topk"):
        pytest.skip("C++ extension not built")
    x, b = make_case(2, 3, 90, torch.float64, seed=4)
    with fusedrnn.use_backend(backend):
        scores, tokens, parents = ops.beam_topk(x, b, 7, 3)
    rs, rt, rp = beam_topk_reference(x, b, 7, 3)
    assert scores.dtype == torch.float64 and torch.equal(tokens, rt) and torch.equal(parents, rp)
    fin = torch.isfinite(rs)
    assert (scores[fin] - rs[fin]).abs().max() < 1e-12 and torch.equal(torch.isinf(scores), torch.isinf(rs))


def test_opcheck_and_compile():
    x = torch.randn(6, 33)
    b = torch.randn(6)
    torch.library.opcheck(ops.beam_topk, (x, b, 5, 3))
    torch.library.opcheck(ops.beam_topk, (x, b.view(2, 3), 5))
    compiled = torch.compile(lambda x, b: ops.beam_topk(x, b, 5, 3), fullgraph=True, backend="eager")
    assert all(torch.equal(a, c) for a, c in zip(compiled(x, b), ops.beam_topk(x, b, 5, 3)))


# --- The CUDA kernels on the emulator: several vocab slices per row (the split heuristic with 132 SMs) -----
EMU_SPLIT_CASES = [(1, 4, 32000, 8), (2, 2, 9000, 128), (3, 2, 5000, 64)]  # 16, 5 and 3 slices per row


@pytest.mark.parametrize("case", EMU_SPLIT_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_emulated_cuda_vocab_splits(dtype, case):
    B, K, V, k = case
    x, b = make_case(B, K, V, DTYPES[dtype], seed=hash(case) % 1000)
    assert_matches("cuda-emu", run_impl("cuda-emu", x, b, k, K), x, b, k, K)


def test_emulated_cuda_op_dispatch():
    x = torch.randn(4, 50)
    b = torch.zeros(4)
    run_impl("cuda-emu", x, b, 1, 2)  # skips when not built
    with fusedrnn.use_backend("auto"):
        assert ops.beam_topk_backend(x, 8) != "cuda-emu"  # never automatic
    with fusedrnn.use_backend("cuda-emu"):
        assert ops.beam_topk_backend(x, 8) == "cuda-emu"
        assert_matches("cuda-emu via op", ops.beam_topk(x, b, 8, 2), x, b, 8, 2)
        with pytest.raises(fusedrnn.BackendUnsupportedError, match="k <= 128"):
            ops.beam_topk(torch.randn(4, 200), b, 129, 2)
    with pytest.raises(RuntimeError, match="logits must be float16/bfloat16/float32"):
        torch.ops.fusedrnn.cuda_emu_beam_topk(x.double(), b, 8, 2)
    with pytest.raises(RuntimeError, match=r"k=129 must be in \[1, min\(128"):
        torch.ops.fusedrnn.cuda_emu_beam_topk(torch.randn(4, 200), b, 129, 2)


# --- GPU (unverified here: no GPU on the development machine) -----------------------------------------
GPU_CASES = [(1, 4, 32000, 8), (32, 4, 32000, 8), (4, 16, 128 * 1024, 32), (2, 8, 256 * 1024, 64),
             (3, 2, 5000, 128), (1, 1, 7, 5), (2, 4, 40, 100)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_gpu_matches_reference(impl, dtype, case):
    if impl == "cuda" and not hasattr(torch.ops.fusedrnn, "cuda_beam_topk"):
        pytest.fail(f"CUDA kernels not built: {fusedrnn.extension_error()}")
    B, K, V, k = case
    x, b = make_case(B, K, V, DTYPES[dtype], seed=hash(case) % 1000, device="cuda")
    got = run_impl(impl, x, b, k, K)
    assert_matches(impl, got, x.cpu(), b.cpu(), k, K)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_gpu_special_values(impl):
    K, V = 3, 20
    x = torch.randn(2 * K, V)
    x[1, 5] = math.nan
    x[3] = -math.inf
    b = torch.zeros(2 * K)
    b[5] = -math.inf
    got = run_impl(impl, x.cuda(), b.cuda(), 7, K)
    assert_matches(impl, got, x, b, 7, K)


@pytest.mark.gpu
def test_gpu_auto_dispatch():
    x = torch.randn(8, 1000, device="cuda")
    expect = "cuda" if hasattr(torch.ops.fusedrnn, "cuda_beam_topk") else "triton"
    with fusedrnn.use_backend("auto"):
        assert ops.beam_topk_backend(x, 8) == expect


# --- Triton: compiles for the GPU (ahead of time, no GPU needed) --------------------------------------
AOT_SCRIPT = r"""
import sys, triton
from triton.backends.compiler import GPUTarget
from fusedrnn.triton import beam_topk as bt
configs = eval(sys.argv[1])
for arch, dtype, KP in configs:
    target = GPUTarget("cuda", arch, 32)
    partial = {"x_ptr": "*" + dtype, "row_stride": "i64", "V": "i32", "chunk": "i32", "keys_ptr": "*u64",
               "m_ptr": "*fp32", "s_ptr": "*fp32", "bad_ptr": "*i32", "KP": "constexpr", "BLOCK": "constexpr"}
    merge = {"keys_ptr": "*u64", "m_ptr": "*fp32", "s_ptr": "*fp32", "bad_ptr": "*i32", "beam_ptr": "*fp32",
             "tok_ptr": "*i64", "out_score_ptr": "*fp32", "out_token_ptr": "*i64", "out_parent_ptr": "*i64",
             "K": "i32", "NS": "i32", "k": "i32", "KK": "i32", "KP": "constexpr"}
    for fn, sig, consts in ((bt._beam_topk_partial, partial, {"KP": KP, "BLOCK": 1024}),
                            (bt._beam_topk_merge, merge, {"KP": KP})):
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
        kernel = triton.compile(src, target=target, options={"num_warps": 4})
        assert ".local" not in kernel.asm["ptx"], f"{fn.__name__} {consts} sm_{arch}: local memory"
        assert kernel.metadata.shared <= 48 * 1024, f"{fn.__name__} {consts}: {kernel.metadata.shared} B shared"
        print(fn.__name__, arch, dtype, KP, kernel.metadata.shared)
"""


def _aot_compile(configs):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT, repr(configs)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("\n") == 2 * len(configs)


def test_triton_compiles_for_sm90():
    """What the interpreter cannot see: the kernels lower to PTX for sm_90 (globals must be constexpr,
    constexpr names not rebound...), without local memory. ~8 s."""
    _aot_compile([(90, "fp16", 128)])


@pytest.mark.slow
def test_triton_compiles_every_variant():
    _aot_compile([(arch, dtype, KP) for arch in (80, 90) for dtype in ("fp32", "fp16", "bf16")
                  for KP in (16, 32, 64, 128)])


# --- CUDA: compiles for sm_80 / sm_90a without spills (no GPU needed) ----------------------------------
def test_cuda_kernels_compile_without_local_memory():
    """csrc/cuda/beam_topk.cu with setup.py's nvcc flags: every kernel (3 dtypes x 3 list widths, 3 merges)
    must have no stack frame and no spills -- the top-k lists are meant to live in registers (an earlier
    version kept them in 32-48 bytes of local memory). ~15 s."""
    import os
    import re
    import shutil
    import subprocess
    from pathlib import Path
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        pytest.skip("nvcc not found")
    root = Path(__file__).resolve().parents[1]
    cmd = [nvcc, "-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", "-DFUSEDRNN_WITH_CUDA",
           f"-I{root / 'csrc'}", "-Xptxas", "-v", "-gencode=arch=compute_80,code=sm_80",
           "-gencode=arch=compute_90a,code=sm_90a", "-c", str(root / "csrc" / "cuda" / "beam_topk.cu"),
           "-o", os.devnull]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    assert len(frames) == 2 * (9 + 3), proc.stderr[-2000:]  # 2 archs x (9 partial + 3 merge kernels)
    assert all(f == ("0", "0", "0") for f in frames), frames
