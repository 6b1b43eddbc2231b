"""Index width of the kernels (issue #18, long sequences): offsets into [T, B, W] tensors past 2^31 elements.

T = 10^6 at B=64, H=256 puts an LSTM's x_gates row t at t * B * 4H ~ 6.5e10 elements: any step offset computed
in 32 bits wraps. These tests run the Triton kernels' own address arithmetic at such offsets, on the CPU:

- the tensors are views into address space reserved with mmap(MAP_NORESERVE): [T, B, W] with T = 10^6 and
  T * B * W > 2^31 (tens of GB of address space), of which only the pages of the rows a kernel touches are ever
  backed by memory (a few MB); 2^31 elements of reserved space lie before each tensor, so an offset that wrapped
  in int32 lands inside the mapping (wrong data, never a crash);
- Triton's interpreter computes addresses like the compiled kernel: program ids, tl.arange and int scalar
  arguments under 2^31 are int32 (numpy int32, which wraps), products with an int64 operand are int64;
- each kernel runs twice on the same data: on compact [3, B, W] tensors at a step near 0, and on the [T, B, W]
  views at the same step moved to the end of the sequence (rows T-3..T-1 hold the compact rows). Every output
  must be bit-identical. A step offset computed in int32 reads and writes elsewhere and the rows differ.
- The persistent kernels loop over all T steps; here their loop is capped to its first two iterations
  (`range` in the module's globals, which the interpreter executes as Python): the reverse forward and the
  forward-direction backward start at t = T-1, so those two steps are the largest offsets of the sequence.

Shown to bite: removing `.to(tl.int64)` from `t64 = t.to(tl.int64)` in lstm_pointwise_fwd_kernel, or from the
`tp.to(tl.int64)` of the GRU persistent backward's previous-state load, makes the matching test fail.

The CUDA kernels (csrc/cuda) cannot be reached this way (the emulator runs whole launches of T steps); their
offsets are int64 by construction (static_cast<int64_t>(t) before every product with B), and what cannot be
widened -- the int32 fields of the kernel parameter structs -- is refused by the backend (tested below).
"""
from __future__ import annotations

import builtins
import mmap
import os

import pytest
import torch

pytest.importorskip("triton")

from fusedrnn.backends import LayerCall  # noqa: E402
from fusedrnn.backends.cuda import CudaBackend, int32_reason  # noqa: E402
from fusedrnn.backends.triton import TritonBackend, plan, use_path  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
INT32_MAX = 2**31 - 1

T_BIG = 10**6
B = 5      # odd: a partial batch tile (BLOCK_B = 8) and masked rows
H = 450    # (T-3) * B * H > 2^31: even the narrowest [T, B, H] offset passes int32
HO = 440   # the LSTM projection's output width; (T-3) * B * HO > 2^31 too
R = 3      # rows of the compact tensors: t-1, t, t+1
assert (T_BIG - R) * B * min(H, HO) > INT32_MAX
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux value; Python < 3.13 does not export it


class _AddressSpace:
    """[T, B, W] tensors in reserved, uncommitted address space (pages appear when first touched)."""

    def __init__(self):
        self.maps = []

    def tensor(self, shape, dtype):
        n = 1
        for s in shape:
            n *= s
        guard = 2**31  # an int32-wrapped offset lies in [-2^31, 2^31): inside [guard before, tensor]
        size = (guard + n) * torch.empty((), dtype=dtype).element_size()
        try:
            m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        except (OSError, ValueError) as e:
            pytest.skip(f"cannot reserve {size / 2**30:.0f} GiB of address space: {e}")
        self.maps.append(m)
        return torch.frombuffer(m, dtype=dtype)[guard:guard + n].view(shape)


@pytest.fixture
def space():
    s = _AddressSpace()
    yield s
    s.maps.clear()  # unmapped once the tensors viewing them are gone


def _run_pair(space, kernel, spec, consts, grid):
    """Runs `kernel` on compact tensors and on [T_BIG, ...] views (see the module doc); asserts every tensor
    argument ends up bit-identical. spec: ("seq", W, dtype) a [T, B, W] tensor; ("buf", shape, dtype) any other;
    ("len",) int64 lengths; ("t", row) the step (its row in the compact tensors); ("T",); ("int", v)."""
    g = torch.Generator().manual_seed(0)
    small, big, pairs = [], [], []
    shift = T_BIG - R
    for a in spec:
        kind = a[0]
        if kind == "seq":
            s = (torch.randn(R, B, a[1], generator=g) * 0.5).to(a[2])
            v = space.tensor((T_BIG, B, a[1]), a[2])
            v[shift:] = s
            small.append(s)
            big.append(v)
            pairs.append((s, v[shift:]))
        elif kind == "buf":
            s = (torch.randn(*a[1], generator=g) * 0.5).to(a[2])
            small.append(s)
            big.append(s.clone())
            pairs.append((s, big[-1]))
        elif kind == "len":  # one sequence of each kind: full, ends inside the rows, ends before them
            s = torch.tensor([R, R - 1, R, R - 2, R][:B], dtype=torch.int64)
            small.append(s)
            big.append(s + shift)
        elif kind == "t":
            small.append(a[1])
            big.append(a[1] + shift)
        elif kind == "T":
            small.append(R)
            big.append(T_BIG)
        else:
            small.append(a[1])
            big.append(a[1])
    kernel[grid](*small, **consts)
    kernel[grid](*big, **consts)
    for i, (s, b) in enumerate(pairs):
        assert torch.equal(s, b), f"tensor argument {i}: the run at t ~ {T_BIG} differs from the one at t ~ 0"


needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs the kernels in Triton's interpreter "
                                                             "(TRITON_INTERPRET=1, set by conftest without a GPU)")
f16, f32, i64 = torch.float16, torch.float32, torch.int64


# ---------------------------------------------------------------------------------------------------
# Fused gate kernels (the alternating path): one step t per launch
# ---------------------------------------------------------------------------------------------------
def _pointwise_case(name, reverse):
    from fusedrnn.triton import rnn_pointwise as PW
    S = lambda w, dt=f16: ("seq", w, dt)  # noqa: E731
    Bf = lambda w, dt=f16: ("buf", (B, w), dt)  # noqa: E731
    dummy = ("buf", (1,), f16)
    t = ("t", 1)
    if name == "lstm_fwd":
        WS = 5 * H
        spec = [S(4 * H), Bf(4 * H), ("buf", (4 * H,), f32), ("buf", (4 * H,), f32), Bf(H, f32), Bf(H), ("len",),
                S(WS), dummy, Bf(H, f32), Bf(H), S(H), t, ("int", B), ("int", H), ("int", WS), ("int", H)]
        return PW.lstm_pointwise_fwd_kernel, spec, dict(HAS_BIAS=True, HAS_PROJ=False, HAS_LENGTHS=True,
                                                        WRITE_WS=True)
    if name == "lstm_bwd":
        WS = 5 * H
        spec = [S(WS), Bf(H), S(H), dummy, Bf(H), Bf(H, f32), Bf(H, f32), ("len",), S(4 * H), Bf(H, f32),
                Bf(H, f32), t, ("T",), ("int", B), ("int", H), ("int", WS)]
        return PW.lstm_pointwise_bwd_kernel, spec, dict(HAS_PROJ=False, HAS_LENGTHS=True, REVERSE=reverse)
    if name == "gru_fwd":
        spec = [S(3 * H), Bf(3 * H), ("buf", (3 * H,), f32), ("buf", (3 * H,), f32), Bf(H), ("len",), S(4 * H),
                Bf(H), S(H), t, ("int", B), ("int", H)]
        return PW.gru_pointwise_fwd_kernel, spec, dict(HAS_BIAS=True, HAS_LENGTHS=True, WRITE_WS=True)
    if name == "gru_bwd":
        spec = [S(4 * H), S(H), Bf(H), S(H), Bf(H), Bf(H, f32), ("len",), S(3 * H), S(3 * H), Bf(H, f32), t,
                ("T",), ("int", B), ("int", H)]
        return PW.gru_pointwise_bwd_kernel, spec, dict(HAS_LENGTHS=True, REVERSE=reverse)
    if name == "rnn_fwd":
        spec = [S(H), Bf(H), ("buf", (H,), f32), ("buf", (H,), f32), Bf(H), ("len",), Bf(H), S(H), t, ("int", B),
                ("int", H)]
        return PW.rnn_pointwise_fwd_kernel, spec, dict(RELU=False, HAS_BIAS=True, HAS_LENGTHS=True)
    assert name == "rnn_bwd"
    spec = [S(H), S(H), Bf(H), Bf(H, f32), ("len",), S(H), Bf(H, f32), t, ("int", B), ("int", H)]
    return PW.rnn_pointwise_bwd_kernel, spec, dict(RELU=False, HAS_LENGTHS=True)


@needs_interpreter
@pytest.mark.parametrize("name,reverse", [("lstm_fwd", False), ("lstm_bwd", False), ("lstm_bwd", True),
                                          ("gru_fwd", False), ("gru_bwd", False), ("gru_bwd", True),
                                          ("rnn_fwd", False), ("rnn_bwd", False)])
def test_pointwise_kernels_past_int32(space, name, reverse):
    """Step t = T-2 of T = 10^6 (its previous step t-1 or t+1 read too) against step 1 of T = 3."""
    kernel, spec, consts = _pointwise_case(name, reverse)
    BLOCK = 128
    _run_pair(space, kernel, spec, dict(consts, BLOCK=BLOCK), (B, -(-H // BLOCK)))


# ---------------------------------------------------------------------------------------------------
# Persistent kernels (no barrier): all steps in one launch, loop capped to its first two iterations
# ---------------------------------------------------------------------------------------------------
def _persistent_case(name, proj):
    from fusedrnn.triton import rnn_persistent as P
    S = lambda w, dt=f16: ("seq", w, dt)  # noqa: E731
    Bf = lambda w, dt=f16: ("buf", (B, w), dt)  # noqa: E731
    dummy, sync = ("buf", (1,), f16), ("buf", (1,), torch.int32)
    ho = HO if proj else H
    common = dict(HAS_LENGTHS=True, BARRIER=False, DOT_FP32=True, BLOCK_H=P.block(H), BLOCK_HO=P.block(ho),
                  BLOCK_B=P.BLOCK_B, H=H)
    # the reverse forward runs t = T-1, T-2 first; the backward of the forward direction too
    fwd, bwd = dict(common, REVERSE=True), dict(common, REVERSE=False)
    if name == "lstm_fwd":
        WS = (6 if proj else 5) * H
        spec = [S(4 * H), ("buf", (4 * H,), f32), ("buf", (4 * H,), f32), Bf(ho), Bf(H), ("buf", (4 * H, ho), f16),
                ("buf", (ho, H), f16) if proj else dummy, ("len",), S(ho), Bf(ho), Bf(H), S(WS), dummy, sync, ("T",),
                ("int", B)]
        return P.lstm_persistent_fwd_kernel, spec, dict(fwd, HO=ho, HAS_BIAS=True, HAS_PROJ=proj, WRITE_WS=True)
    if name == "lstm_bwd":
        WS = (6 if proj else 5) * H
        spec = [S(WS), Bf(H), ("buf", (4 * H, ho), f16), ("buf", (ho, H), f16) if proj else dummy, ("len",),
                S(ho), Bf(ho), Bf(H), S(4 * H), S(ho) if proj else dummy, Bf(ho, f32), Bf(H, f32), dummy, sync,
                ("T",), ("int", B)]
        return P.lstm_persistent_bwd_kernel, spec, dict(bwd, HO=ho, HAS_PROJ=proj)
    if name == "gru_fwd":
        spec = [S(3 * H), ("buf", (3 * H,), f32), ("buf", (3 * H,), f32), Bf(H), ("buf", (3 * H, H), f16), ("len",),
                S(H), Bf(H), S(4 * H), dummy, sync, ("T",), ("int", B)]
        return P.gru_persistent_fwd_kernel, spec, dict(fwd, HAS_BIAS=True, WRITE_WS=True)
    if name == "gru_bwd":
        spec = [S(4 * H), S(H), Bf(H), ("buf", (3 * H, H), f16), ("len",), S(H), Bf(H), S(3 * H), S(3 * H),
                Bf(H, f32), dummy, sync, ("T",), ("int", B)]
        return P.gru_persistent_bwd_kernel, spec, bwd
    if name == "rnn_fwd":
        spec = [S(H), ("buf", (H,), f32), ("buf", (H,), f32), Bf(H), ("buf", (H, H), f16), ("len",), S(H), Bf(H),
                dummy, sync, ("T",), ("int", B)]
        return P.rnn_persistent_fwd_kernel, spec, dict(fwd, RELU=False, HAS_BIAS=True)
    assert name == "rnn_bwd"
    spec = [S(H), ("buf", (H, H), f16), ("len",), S(H), Bf(H), S(H), Bf(H, f32), dummy, sync, ("T",), ("int", B)]
    return P.rnn_persistent_bwd_kernel, spec, dict(bwd, RELU=False)


@needs_interpreter
@pytest.mark.parametrize("name,proj", [("lstm_fwd", False), ("lstm_fwd", True), ("lstm_bwd", False),
                                       ("lstm_bwd", True), ("gru_fwd", False), ("gru_bwd", False),
                                       ("rnn_fwd", False), ("rnn_bwd", False)])
def test_persistent_kernels_past_int32(space, monkeypatch, name, proj):
    """Steps T-1 and T-2 of T = 10^6 against steps 2 and 1 of T = 3."""
    from fusedrnn.triton import rnn_persistent as P
    monkeypatch.setitem(P.__dict__, "range", lambda n: builtins.range(min(int(n), 2)))
    kernel, spec, consts = _persistent_case(name, proj)
    _run_pair(space, kernel, spec, consts, (-(-B // P.BLOCK_B), 1))


# ---------------------------------------------------------------------------------------------------
# Sizes the kernels cannot take: refused with the argument named, so "auto" falls back
# ---------------------------------------------------------------------------------------------------
def _call(cell, T, B_, H_, dtype=torch.float16, device="cpu"):
    """A LayerCall whose x holds no memory when B_ = 0 or T = 0 (shape checks only)."""
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    x = torch.empty(T, B_, 1, dtype=dtype, device=device)
    h0 = torch.empty(1, dtype=dtype, device=device).expand(B_, H_)
    w = torch.empty(1, dtype=dtype, device=device).expand(G * H_, H_)
    return LayerCall(cell, x, h0, h0 if cell == "lstm" else None, w[:, :1], w, None, None, None, None, False)


def test_cuda_refuses_sizes_past_int32():
    """T, B and H travel to the CUDA kernels as int fields of their parameter structs (csrc/cuda/rnn_kernels.h)."""
    why = CudaBackend().unsupported_reason(_call("lstm", 2**31, 0, 8))
    assert why is not None and "T=2147483648" in why and "2147483647" in why
    why = CudaBackend().unsupported_reason(_call("gru", 5, 2**31, 0))
    assert why is not None and "B=2147483648" in why
    assert int32_reason(_call("gru", INT32_MAX, 0, 8)) is None


def test_triton_refuses_steps_wider_than_int32():
    """One step's [B, W] block addressed with int32 program-id arithmetic: B * W must stay under 2^31."""
    why = TritonBackend().unsupported_reason(_call("lstm", 1, 2**20, 2**10))  # B * 5H = 5 * 2^30
    assert why is not None and "B * W" in why and str(5 * 2**30) in why


@needs_interpreter
def test_triton_persistent_refuses_t_past_int32():
    """The persistent kernels hold lengths as int32: T >= 2^31 goes to the alternating path (auto) or is refused
    (forced)."""
    call = _call("rnn_tanh", 2**31, 0, 16)
    assert plan(call)[0] == "alternating"
    with use_path("persistent"):
        path, _, why = plan(call)
        assert path is None and "T=2147483648" in why


def test_barrier_counter_limit():
    """The barrier's arrival counter is int32: T * slices arrivals must fit (else the path is refused)."""
    from fusedrnn.triton import rnn_persistent as P
    assert P.barrier_counter_reason(10**6, 8) is None
    why = P.barrier_counter_reason(2**28, 8)
    assert why is not None and "T=268435456" in why and "8 slices" in why
