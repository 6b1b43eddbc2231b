"""The rnn_layer_ext row kernels of backends "cuda" and "cuda-emu" (csrc/cuda/rnn_ext.cu; providers
fusedrnn.backends.ext_cuda) against ReferenceRows, the contract of fusedrnn.backends.ext.

Rows: both kernels, cell x layer norm x zoneout x bias x valid (every one of the 32 combinations once, at
B in {1, 3}, H in {1, 63, 129}), fp32, fp16 and bf16, each output and the mutated acc against ReferenceRows run in
fp64 on the same (rounded) inputs. Tolerance (tests/helpers.py's rule): at most FACTOR times the error of
ReferenceRows itself run at that dtype (computing in fp32) plus a few units in the last place. Exact: invalid rows
(state kept, y = 0, gradients passed through, d_ax = d_ah = 0, acc untouched), units kept by zoneout, acc blocks of
absent parameters. Also: hidden sizes whose row cache leaves shared memory (global scratch), more rows than the
kernels' grid (rows looped over), strided inputs, argument errors, the providers' refusals; end to end, the driver
ext_forward / ext_backward with CudaEmuRows against ReferenceRows (T=3, reverse, lengths with a zero) and
fusedrnn.functional.rnn_layer_ext on backend cuda-emu. The same row tests on CUDA tensors (CudaRows) are
@pytest.mark.gpu.
"""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

import fusedrnn
from fusedrnn import functional
from fusedrnn.backends import scoped_environ
from fusedrnn.backends.ext import ReferenceRows, ext_acc_width, ext_backward, ext_forward
from fusedrnn.backends.ext_cuda import CudaEmuRows, CudaRows
from helpers import FACTOR, ULP_FLOOR, max_error

EMU_REASON = CudaEmuRows.unavailable_reason(torch.device("cpu"))
needs_emu = pytest.mark.skipif(EMU_REASON is not None, reason=f"cuda-emu row kernels unavailable: {EMU_REASON}")
TARGETS = [pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("cuda-emu", marks=needs_emu)]
PROVIDER = {"cuda": CudaRows, "cuda-emu": CudaEmuRows}
DEVICE = {"cuda": "cuda", "cuda-emu": "cpu"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GATES = {"lstm": 4, "gru": 3}
# Floor of the tolerance, in units of max(1, |reference|): a few ulp of the dtype (fp32: 2^-23).
FLOOR = {torch.float32: 8 * 2.0 ** -23, **ULP_FLOOR}

FORWARD_OUT = ("h_new", "c_new", "y")
BACKWARD_OUT = ("d_ax", "d_ah", "grad_h_prev", "grad_c_prev")
ACC_BLOCKS = ("b_ih", "b_hh", "ln_ih", "ln_hh", "ln_c_weight", "ln_c_bias")


def acc_blocks(cell, H):
    """{parameter: column slice of acc} (backends.ext module doc)."""
    GH = GATES[cell] * H
    blocks = {"b_ih": slice(0, GH), "b_hh": slice(GH, 2 * GH), "ln_ih": slice(2 * GH, 3 * GH),
              "ln_hh": slice(3 * GH, 4 * GH)}
    if cell == "lstm":
        blocks.update(ln_c_weight=slice(4 * GH, 4 * GH + H), ln_c_bias=slice(4 * GH + H, 4 * GH + 2 * H))
    return blocks


def make_rows(cell, B, H, ln, zoneout, bias, valid, seed=0):
    """fp64 arguments of one step: (forward kwargs, backward extras without acc, initial acc)."""
    g = torch.Generator().manual_seed(seed)
    G = GATES[cell]
    GH = G * H
    lstm = cell == "lstm"

    def normal(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    def mask():
        return (torch.rand(B, H, generator=g) < 0.3).double()

    fwd = dict(cell=cell, ax=normal(B, GH, shift=0.4), ah=normal(B, GH, scale=0.7, shift=-0.2),
               b_ih=normal(GH, scale=0.3) if bias else None, b_hh=normal(GH, scale=0.3) if bias else None,
               ln_ih=normal(GH, scale=0.3, shift=1.0) if ln else None,
               ln_hh=normal(GH, scale=0.3, shift=1.0) if ln else None,
               ln_c_weight=normal(H, scale=0.3, shift=1.0) if ln and lstm else None,
               ln_c_bias=normal(H, scale=0.3) if ln and lstm else None,
               h_prev=normal(B, H, scale=0.5), c_prev=normal(B, H, scale=0.5) if lstm else None,
               zoneout_h=mask() if zoneout else None, zoneout_c=mask() if zoneout and lstm else None,
               valid=None if valid is None else torch.tensor(valid))
    bwd = dict(grad_h=normal(B, H), grad_y=normal(B, H), grad_c=normal(B, H) if lstm else None)
    acc = normal(B, ext_acc_width(cell, H))
    return fwd, bwd, acc


_ACC_TYPED = ("grad_h", "grad_c")  # arguments of the acc dtype; the other floating ones are of x's dtype


def cast(kwargs, dtype, device="cpu"):
    acc_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=(acc_dtype if k in _ACC_TYPED else dtype) if v.is_floating_point() else None)
        out[k] = v
    return out


def upcast(kwargs):
    """The same (rounded) arguments in fp64, on the CPU."""
    return {k: (v.detach().cpu().double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


def check_close(name, fast, ref64, native):
    """fast (the kernels) within FACTOR x the error of ReferenceRows at fast's dtype (native) plus a floor."""
    assert fast.shape == ref64.shape, f"{name}: shape {list(fast.shape)} != {list(ref64.shape)}"
    if fast.numel() == 0:
        return
    scale = max(1.0, ref64.abs().max().item())
    native_err = max_error(native.cpu(), ref64)
    tol = FACTOR * native_err + FLOOR[fast.dtype if fast.dtype in FLOOR else torch.float32] * scale
    err = max_error(fast.cpu(), ref64)
    assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g} (ReferenceRows' own error {native_err:.3g})"


def run_rows(rows, target, cell, B, H, ln, zoneout, bias, valid, dtype, seed=0, strided=False):
    """Both kernels of `rows` on one step against ReferenceRows (fp64 and at dtype), with the exact checks."""
    device = DEVICE[target]
    fwd64, bwd64, acc64 = make_rows(cell, B, H, ln, zoneout, bias, valid, seed)
    fwd, bwd = cast(fwd64, dtype, device), cast(bwd64, dtype, device)
    acc_dtype = torch.float32
    acc0 = acc64.to(device=device, dtype=acc_dtype)
    if strided:  # rows of ax, ah, c_prev inside wider buffers (as the driver's workspace views), others transposed
        for k in ("ax", "ah", "c_prev", "grad_h"):
            src = fwd if k in fwd else bwd
            if src.get(k) is not None:
                t = src[k]
                wide = torch.full((t.shape[0], t.shape[1] + 5), float("nan"), dtype=t.dtype, device=device)
                wide[:, 2:2 + t.shape[1]] = t
                src[k] = wide[:, 2:2 + t.shape[1]]
        fwd["h_prev"] = fwd["h_prev"].t().contiguous().t()  # column-major
    fwd_in = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in fwd.items()}

    # forward
    out = rows.forward_rows(**fwd)
    ref = ReferenceRows.forward_rows(**upcast(fwd))
    native = ReferenceRows.forward_rows(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in fwd.items()})
    for name, o, r, n in zip(FORWARD_OUT, out, ref, native):
        assert o.dtype == dtype and o.device.type == device, name
        check_close(f"{name} ({cell} {dtype})", o, r, n)

    # backward
    acc = acc0.clone()
    if strided:
        wide = torch.full((B, acc.shape[1] * 2), float("nan"), dtype=acc.dtype, device=device)
        wide[:, ::2] = acc
        acc = wide[:, ::2]  # no unit inner stride: the op works on a copy and writes it back
    acc_ref = acc64.float().double()
    acc_native = acc0.cpu().clone()
    bout = rows.backward_rows(**fwd, **bwd, acc=acc)
    bref = ReferenceRows.backward_rows(**upcast(fwd), **upcast(bwd), acc=acc_ref)
    bnative = ReferenceRows.backward_rows(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in fwd.items()},
                                          **{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in bwd.items()},
                                          acc=acc_native)
    for name, o, r, n in zip(BACKWARD_OUT, bout, bref, bnative):
        want = dtype if name.startswith("d_") else acc_dtype
        assert o.dtype == want and o.device.type == device, name
        check_close(f"{name} ({cell} {dtype})", o, r, n)
    check_close(f"acc ({cell} {dtype})", acc, acc_ref, acc_native)

    # exact parts of the contract
    for k, v in fwd.items():  # inputs untouched
        if isinstance(v, torch.Tensor):
            assert torch.equal(v.cpu().nan_to_num(), fwd_in[k].cpu().nan_to_num()), f"{k} was modified"
    h_new, c_new, y = out
    d_ax, d_ah, grad_h_prev, grad_c_prev = bout
    lstm = cell == "lstm"
    assert c_new.numel() == (B * H if lstm else 0) and grad_c_prev.numel() == (B * H if lstm else 0)
    valid_rows = torch.ones(B, dtype=torch.bool, device=device) if valid is None else fwd["valid"]
    if fwd["zoneout_h"] is not None:  # units zoneout kept on valid rows: exactly h_prev (c_prev)
        keep = (fwd["zoneout_h"] != 0) & valid_rows[:, None]
        assert torch.equal(h_new[keep], fwd["h_prev"][keep]) and torch.equal(y[keep], fwd["h_prev"][keep]), \
            "zoneout_h: kept units must be h_prev"
    if lstm and fwd["zoneout_c"] is not None:
        keep = (fwd["zoneout_c"] != 0) & valid_rows[:, None]
        assert torch.equal(c_new[keep], fwd["c_prev"][keep]), "zoneout_c: kept units must be c_prev"
    inv = ~valid_rows
    assert torch.equal(h_new[inv], fwd["h_prev"][inv]) and not y[inv].any(), "invalid rows: state kept, y = 0"
    assert not d_ax[inv].any() and not d_ah[inv].any(), "invalid rows: d_ax, d_ah must be 0"
    assert torch.equal(grad_h_prev[inv], bwd["grad_h"][inv]), "invalid rows: grad_h must pass through"
    assert torch.equal(acc[inv], acc0[inv]), "invalid rows: acc must be untouched"
    if lstm:
        assert torch.equal(c_new[inv], fwd["c_prev"][inv]) and torch.equal(grad_c_prev[inv], bwd["grad_c"][inv])
    for k, cols in acc_blocks(cell, H).items():
        if fwd[k] is None:
            assert torch.equal(acc[:, cols], acc0[:, cols]), f"acc block of absent {k} was written"


def _combinations():
    """Every cell x layer norm x zoneout x bias x valid combination once, sizes spread over them."""
    sizes_all_valid = itertools.cycle([(1, 1), (3, 63), (1, 129), (3, 129), (3, 1), (1, 63)])
    sizes_mixed = itertools.cycle([(3, 129), (3, 1), (3, 63)])
    for cell, ln, zoneout, bias, mixed in itertools.product(("lstm", "gru"), (True, False), (True, False),
                                                            (True, False), (False, True)):
        B, H = next(sizes_mixed) if mixed else next(sizes_all_valid)
        valid = [True, False, True] if mixed else None
        name = (f"{cell}-{'ln' if ln else 'noln'}-{'zo' if zoneout else 'nozo'}-{'bias' if bias else 'nobias'}-"
                f"{'mixed' if mixed else 'allvalid'}-B{B}-H{H}")
        yield pytest.param(cell, ln, zoneout, bias, valid, B, H, id=name)


COMBINATIONS = list(_combinations())


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("cell,ln,zoneout,bias,valid,B,H", COMBINATIONS)
def test_rows_fp32(target, cell, ln, zoneout, bias, valid, B, H):
    run_rows(PROVIDER[target], target, cell, B, H, ln, zoneout, bias, valid, torch.float32)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("features", ["all", "none", "ln-only"])
def test_rows_half(target, dtype, cell, features):
    ln, zoneout, bias, valid = {"all": (True, True, True, [True, False, True]), "none": (False, False, False, None),
                                "ln-only": (True, False, False, None)}[features]
    run_rows(PROVIDER[target], target, cell, 3, 129 if features != "none" else 63, ln, zoneout, bias, valid,
             DTYPES[dtype], seed=1)


# Row caches past the H100's 227 KB of shared memory per block (rnn_ext.h layout, fp32): LSTM with the norms
# 56 H bytes backward / 40 H forward, GRU 40 H / 24 H (in shared memory up to H = 4148 / 5808, 5808 / 9680).
# H=4200: the LSTM backward in global scratch, its forward in 168 KB of opt-in shared memory; H=6500 both LSTM
# kernels in scratch; H=9700 both GRU kernels in scratch.
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("cell,H", [("lstm", 4200), ("lstm", 6500), ("gru", 9700)])
def test_rows_large_hidden(target, cell, H):
    run_rows(PROVIDER[target], target, cell, 3, H, True, True, True, [True, False, True], torch.float32, seed=2)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rows_more_rows_than_the_grid(target, cell):
    """B > 4096 rows: each CTA loops over several rows (rnn_ext.h kMaxGrid)."""
    B = 4099
    valid = [b % 5 != 3 for b in range(B)]
    run_rows(PROVIDER[target], target, cell, B, 3, True, True, True, valid, torch.float32, seed=3)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rows_strided_inputs(target, cell):
    """Row-strided views (the driver's workspace), column-major h_prev, and an acc without unit inner stride."""
    run_rows(PROVIDER[target], target, cell, 3, 63, True, True, True, [True, True, False], torch.float32, seed=4,
             strided=True)


# ---------------------------------------------------------------------------------------------------------
# Argument errors and refusals
# ---------------------------------------------------------------------------------------------------------
def _bad(cell, changes):
    fwd64, bwd64, acc64 = make_rows(cell, 2, 5, True, True, True, [True, False])
    fwd, bwd = cast(fwd64, torch.float32), cast(bwd64, torch.float32)
    acc = acc64.float()
    for k, v in changes.items():
        v = v(fwd, bwd) if callable(v) else v
        if k == "acc":
            acc = v
        elif k in fwd:
            fwd[k] = v
        else:
            bwd[k] = v
    return fwd, bwd, acc


# (id, direction, cell, changed arguments, expected words of the error)
BAD = [
    ("fp64", "forward", "lstm", dict(ax=lambda f, b: f["ax"].double()), "ax must be float32, float16 or bfloat16"),
    ("cell", "forward", "lstm", dict(cell="rnn_tanh"), "cell must be 'lstm' or 'gru'"),
    ("ax-shape", "forward", "gru", dict(ax=lambda f, b: f["ax"][:, :-1]), "ax must be [B, 3*H]"),
    ("ah-shape", "forward", "lstm", dict(ah=lambda f, b: f["ah"][:1]), "ah must be [2, 20]"),
    ("ah-dtype", "forward", "lstm", dict(ah=lambda f, b: f["ah"].half()), "ah must be Float"),
    ("h_prev", "forward", "gru", dict(h_prev=lambda f, b: f["h_prev"][:, :4]), "h_prev must be [2, 5]"),
    ("one-bias", "forward", "lstm", dict(b_hh=None), "b_ih, b_hh: give both biases or neither"),
    ("one-gain", "forward", "gru", dict(ln_hh=None), "ln_ih, ln_hh: give both"),
    ("ln_c-alone", "forward", "lstm", dict(ln_c_bias=None), "ln_c_weight, ln_c_bias: give both or neither"),
    ("ln_c-without-norms", "forward", "lstm", dict(ln_ih=None, ln_hh=None),
     "the cell-state norm comes only with ln_ih"),
    ("ln_ih-shape", "forward", "lstm", dict(ln_ih=lambda f, b: f["ln_ih"][:5]), "ln_ih must be [20]"),
    ("ln_c-shape", "forward", "lstm", dict(ln_c_weight=lambda f, b: f["ln_c_weight"][:4]), "ln_c_weight must be [5]"),
    ("c_prev-missing", "forward", "lstm", dict(c_prev=None), "c_prev is required for lstm"),
    ("gru-c_prev", "forward", "gru", dict(c_prev=lambda f, b: f["h_prev"]), "gru has no cell state"),
    ("zoneout-dtype", "forward", "lstm", dict(zoneout_h=lambda f, b: f["zoneout_h"] != 0), "zoneout_h must be Float"),
    ("valid-dtype", "forward", "gru", dict(valid=torch.tensor([1, 0])), "valid must be Bool"),
    ("valid-shape", "forward", "gru", dict(valid=torch.tensor([True])), "valid must be [2]"),
    ("grad_h-dtype", "backward", "lstm", dict(grad_h=lambda f, b: b["grad_h"].double()), "grad_h must be Float"),
    ("grad_y-shape", "backward", "gru", dict(grad_y=lambda f, b: b["grad_y"][:1]), "grad_y must be [2, 5]"),
    ("grad_c-missing", "backward", "lstm", dict(grad_c=None), "grad_c is required for lstm"),
    ("acc-width", "backward", "lstm", dict(acc=lambda f, b: torch.zeros(2, 80)), "acc must be [2, 90]"),
    ("acc-dtype", "backward", "gru", dict(acc=lambda f, b: torch.zeros(2, 60, dtype=torch.float64)),
     "acc must be Float"),
]


@needs_emu
@pytest.mark.parametrize("direction,cell,changes,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_argument_errors_name_the_argument(direction, cell, changes, message):
    fwd, bwd, acc = _bad(cell, changes)
    with pytest.raises(RuntimeError) as info:
        if direction == "forward":
            CudaEmuRows.forward_rows(**fwd)
        else:
            CudaEmuRows.backward_rows(**fwd, **bwd, acc=acc)
    assert message in str(info.value), str(info.value)
    assert f"fusedrnn cuda_emu_ext_{direction}_rows: " in str(info.value)


def test_providers_refuse_with_reasons():
    assert "CUDA tensors only" in CudaRows.unavailable_reason(torch.device("cpu"))
    assert "CPU tensors only" in CudaEmuRows.unavailable_reason(torch.device("cuda"))
    for rows in (CudaRows, CudaEmuRows):
        assert "float64" in rows.unsupported_reason("lstm", torch.float64, 8)
        assert "rnn_tanh" in rows.unsupported_reason("rnn_tanh", torch.float32, 8)
        assert rows.unsupported_reason("gru", torch.bfloat16, 100000) is None  # no limit on H but 32-bit rows
        assert "too large" in rows.unsupported_reason("lstm", torch.float32, 2 ** 29)
    assert CudaRows.name == "cuda" and CudaEmuRows.name == "cuda-emu"
    from fusedrnn.backends.ext import row_kernels
    assert row_kernels("cuda") is CudaRows and row_kernels("cuda-emu") is CudaEmuRows


# ---------------------------------------------------------------------------------------------------------
# End to end: the driver of backends.ext with these row kernels
# ---------------------------------------------------------------------------------------------------------
def make_layer(cell, T, B, I, H, features, lengths, seed=5):
    g = torch.Generator().manual_seed(seed)
    G = GATES[cell]
    lstm = cell == "lstm"
    on = features == "all"
    k = 1 / H ** 0.5

    def uni(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * k

    def normal(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    return dict(cell=cell, x=normal(T, B, I), h0=normal(B, H, scale=0.5), c0=normal(B, H, scale=0.5) if lstm else None,
                w_ih=uni(G * H, I), w_hh=uni(G * H, H), b_ih=uni(G * H) if on else None,
                b_hh=uni(G * H) if on else None,
                ln_ih=normal(G * H, scale=0.2, shift=1.0) if on else None,
                ln_hh=normal(G * H, scale=0.2, shift=1.0) if on else None,
                ln_c_weight=normal(H, scale=0.2, shift=1.0) if on and lstm else None,
                ln_c_bias=normal(H, scale=0.2) if on and lstm else None,
                zoneout_h=(torch.rand(T, B, H, generator=g) < 0.25).double() if on else None,
                zoneout_c=(torch.rand(T, B, H, generator=g) < 0.25).double() if on and lstm else None,
                lengths=None if lengths is None else torch.tensor(lengths))


def _layer_cast(layer, dtype, device="cpu"):
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
            if isinstance(v, torch.Tensor) else v for k, v in layer.items()}


def _driver(rows, layer, reverse, cot_dtype, seed=6):
    """ext_forward then ext_backward with fixed random cotangents (values of cot_dtype): (outputs, gradients)."""
    args = dict(layer)
    cell = args.pop("cell")
    lengths = args.pop("lengths")
    names = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "ln_ih", "ln_hh", "ln_c_weight", "ln_c_bias",
             "zoneout_h", "zoneout_c")
    pos = [args[n] for n in names]
    y, h_n, c_n, ws = ext_forward(rows, cell, *pos, lengths, reverse, True)
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(cot_dtype).to(t)  # noqa: E731
    grad_y, grad_h_n = rnd(y), rnd(h_n)
    grad_c_n = rnd(c_n) if cell == "lstm" else None
    grads = ext_backward(rows, cell, *pos, lengths, reverse, y, ws, grad_y, grad_h_n, grad_c_n)
    return (y, h_n, c_n), grads


GRAD_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "ln_ih", "ln_hh", "ln_c_weight", "ln_c_bias")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("features", ["all", "none"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_driver_end_to_end(target, dtype, cell, features, reverse):
    if dtype == "bf16" and features == "none":
        pytest.skip("one bf16 case per cell and direction")
    dt = DTYPES[dtype]
    layer = make_layer(cell, 3, 4, 5, 33, features, lengths=[3, 1, 0, 2] if features == "all" or reverse else None)
    fast = _layer_cast(layer, dt, DEVICE[target])
    ref_in = upcast(fast)
    outs, grads = _driver(PROVIDER[target], fast, reverse, dt)
    ref_outs, ref_grads = _driver(ReferenceRows, ref_in, reverse, dt)
    nat_outs, nat_grads = _driver(ReferenceRows, {k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                  for k, v in fast.items()}, reverse, dt)
    for name, o, r, n in zip(("y", "h_n", "c_n"), outs, ref_outs, nat_outs):
        assert o.dtype == dt
        check_close(name, o, r, n)
    for name, o, r, n in zip(GRAD_NAMES, grads, ref_grads, nat_grads):
        assert o.dtype == dt and o.shape == r.shape, name
        check_close(f"grad {name}", o, r, n)


@contextlib.contextmanager
def _backend(name):
    with scoped_environ({"FUSEDRNN_BACKEND": name}), fusedrnn.use_backend(name):  # autograd's thread: environment
        yield


@needs_emu
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_functional_on_cuda_emu(cell):
    """fusedrnn.functional.rnn_layer_ext (the op, its autograd) on backend cuda-emu against the spec."""
    from fusedrnn import reference
    layer = make_layer(cell, 3, 3, 4, 17, "all", lengths=[3, 0, 2])
    layer32 = _layer_cast(layer, torch.float32)
    args = {k: v for k, v in layer32.items() if k != "cell"}
    leaves = {k: v.requires_grad_() for k, v in args.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point() and not k.startswith("zoneout")}
    with _backend("cuda-emu"):
        out = functional.rnn_layer_ext(cell, **args)
    out = [o for o in out if o is not None]
    cot = [torch.randn_like(o) for o in out]
    grads = torch.autograd.grad(out, list(leaves.values()), cot)
    args64 = {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in args.items()}
    leaves64 = {k: args64[k].requires_grad_() for k in leaves}
    ref = [o for o in reference.rnn_layer_ext(cell, **args64) if o is not None]
    ref_grads = torch.autograd.grad(ref, list(leaves64.values()), [c.double() for c in cot])
    for name, o, r in zip(("y", "h_n", "c_n"), out, ref):
        assert max_error(o, r) <= 2e-5 * max(1.0, r.abs().max().item()), name
    for name, o, r in zip(leaves, grads, ref_grads):
        assert max_error(o, r) <= 2e-5 * max(1.0, r.abs().max().item()), f"grad {name}"
