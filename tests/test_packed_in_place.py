"""The cpu kernel on a PackedSequence's data in place (csrc/cpu/rnn_layer.cpp, StepRows; fusedrnn.ops.
run_packed_layer) and the modules' PackedSequence path that uses it on CPU tensors.

The spec of a packed layer call is the reference layer on the padded, sorted batch with the lengths the
batch_sizes give, its output packed back: every output and the gradient of every input (packed data, h0, c0,
each weight) is checked against it in fp64 and in each dtype the kernel takes (16-bit computed in fp32 as the
backend doc says, tolerance from the spec's own error at that dtype: tests/helpers.py); the modules against
torch.nn on the same PackedSequence."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fusedrnn
from fusedrnn import nn as fnn
from fusedrnn._extension import has_extension

from helpers import assert_close_to_reference, outputs_and_grads, packed_fast, packed_layer_args, packed_spec

pytestmark = pytest.mark.skipif(not has_extension(), reason="needs the C++ extension")

CELLS = {  # cell, proj (H_out)
    "lstm": ("lstm", None),
    "lstm-proj": ("lstm", 3),
    "gru": ("gru", None),
    "rnn_tanh": ("rnn_tanh", None),
    "rnn_relu": ("rnn_relu", None),
}
SHAPES = {  # T, B, I, H, lengths (sorted, longest first; None: random in [1, T] with one of T)
    "T1-B1-H1": (1, 1, 2, 1, [1]),
    "T7-B3-H5": (7, 3, 4, 5, [7, 4, 1]),
    "T9-B5-H63-equal": (9, 5, 3, 63, [9, 9, 9, 9, 9]),
    "T12-B17-H6": (12, 17, 5, 6, None),  # random lengths (one thread: test_cpu_threads splits the team)
}


def _layer_args(cell, proj, T, B, I, H, lengths, seed=0):
    if lengths is None:  # random in [1, T], one of T, sorted
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        lengths = lengths.sort(descending=True).values
    return packed_layer_args(cell, T, B, I, H, lengths, proj=proj or 0, seed=seed)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("cell_id", list(CELLS))
def test_packed_layer_matches_spec_fp64(cell_id, shape, reverse):
    cell, proj = CELLS[cell_id]
    args, batch_sizes, lengths = _layer_args(cell, proj, *SHAPES[shape])
    want_out, want_grads = outputs_and_grads(lambda **a: packed_spec(cell, batch_sizes, lengths, reverse, **a), args)
    out, grads = outputs_and_grads(lambda **a: packed_fast(cell, batch_sizes, reverse, **a), args)
    assert len(out) == len(want_out)
    for name, o, w in zip(("y", "h_n", "c_n"), out, want_out):
        assert_close_to_reference(name, o, w)
    assert set(grads) == set(want_grads)
    for name, g in grads.items():
        assert_close_to_reference(f"grad {name}", g, want_grads[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell_id", ["lstm", "lstm-proj", "gru", "rnn_tanh"])
def test_packed_layer_low_precision(cell_id, reverse, dtype):
    cell, proj = CELLS[cell_id]
    args64, batch_sizes, lengths = _layer_args(cell, proj, *SHAPES["T7-B3-H5"])
    want_out, want_grads = outputs_and_grads(lambda **a: packed_spec(cell, batch_sizes, lengths, reverse, **a), args64)
    cast = {n: (t.to(dtype) if t is not None else None) for n, t in args64.items()}
    native_out = native_grads = None
    if dtype != torch.float32:  # the spec computed natively at dtype: its error sets the tolerance
        native_out, native_grads = outputs_and_grads(
            lambda **a: packed_spec(cell, batch_sizes, lengths, reverse, **a, compute_dtype=dtype), cast)
    out, grads = outputs_and_grads(lambda **a: packed_fast(cell, batch_sizes, reverse, **a), cast)
    for i, (name, o, w) in enumerate(zip(("y", "h_n", "c_n"), out, want_out)):
        assert o.dtype == dtype
        assert_close_to_reference(name, o, w, native_out[i] if native_out else None)
    for name, g in grads.items():
        assert g.dtype == dtype, name
        assert_close_to_reference(f"grad {name}", g, want_grads[name], native_grads[name] if native_grads else None)


@pytest.mark.parametrize("cell_id", ["lstm-proj", "gru", "rnn_relu"])
def test_packed_layer_gradcheck_and_double_backward(cell_id):
    cell, proj = CELLS[cell_id]
    args, batch_sizes, _ = _layer_args(cell, proj, 5, 3, 2, 3, [5, 3, 2])
    names = [n for n, t in args.items() if t is not None]
    leaves = [args[n].clone().requires_grad_(True) for n in names]

    def fn(*tensors):
        kw = dict(zip(names, tensors), **{n: None for n, t in args.items() if t is None})
        return tuple(o for o in packed_fast(cell, batch_sizes, True, **kw) if o is not None)

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)  # create_graph=True: the differentiable spec path


def test_modules_refuse_a_hand_made_layout():
    """A PackedSequence whose sorted_indices is no permutation raises (as unpacking it did), naming it."""
    gru = fusedrnn.GRU(2, 3)
    packed = pack_padded_sequence(torch.randn(4, 3, 2), torch.tensor([2, 4, 1]), enforce_sorted=False)
    bad = PackedSequence(packed.data, packed.batch_sizes, torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]))
    with pytest.raises(RuntimeError, match=r"sorted_indices: expected a permutation of 0..2, got 0 at position 1"):
        gru(bad)


def test_packed_backward_refuses_mis_sized_state_gradients():
    """The op's backward checks every state gradient's shape (a [1, 2] grad_h_n for B=3 corrupted memory)."""
    args, batch_sizes, _ = _layer_args("lstm", None, 4, 3, 2, 3, [4, 2, 1])
    call = ("lstm", args["data"], args["h0"], args["c0"], args["w_ih"], args["w_hh"], args["b_ih"], args["b_hh"],
            None, None, False)
    y, h_n, c_n, ws = torch.ops.fusedrnn.cpu_rnn_layer(*call, True, batch_sizes)
    backward = torch.ops.fusedrnn.cpu_rnn_layer_backward
    with pytest.raises(RuntimeError, match=r"grad_h_n must be \[B, H_out\] = \[3, 3\], got \[1, 2\]"):
        backward(*call, y, ws, torch.ones_like(y), torch.zeros(1, 2, dtype=torch.float64), c_n, batch_sizes)
    with pytest.raises(RuntimeError, match=r"grad_c_n must be an LSTM's \[B, H\] = \[3, 3\]"):
        backward(*call, y, ws, torch.ones_like(y), h_n, torch.zeros(3, 1, dtype=torch.float64), batch_sizes)


def test_packed_layer_refuses_bad_layouts():
    args, batch_sizes, _ = _layer_args("gru", None, 4, 3, 2, 3, [4, 2, 1])
    op = torch.ops.fusedrnn.cpu_rnn_layer
    pos = lambda data, bs, lengths=None: op("gru", data, args["h0"], None, args["w_ih"], args["w_hh"],  # noqa: E731
                                            args["b_ih"], args["b_hh"], None, lengths, False, False, bs)
    with pytest.raises(RuntimeError, match=r"batch_sizes sum to 7 rows, but the data has 6"):
        pos(args["data"][:6], batch_sizes)
    with pytest.raises(RuntimeError, match=r"batch_sizes: expected non-increasing values >= 1, got 3 at step 1"):
        pos(args["data"], torch.tensor([2, 3, 1, 1]))
    with pytest.raises(RuntimeError, match=r"h0 must be \[B, H_out\]"):
        pos(args["data"][:6], torch.tensor([2, 2, 1, 1]))  # B = 2 from batch_sizes, h0 has 3 rows
    with pytest.raises(RuntimeError, match=r"lengths must be None with batch_sizes"):
        pos(args["data"], batch_sizes, torch.tensor([4, 2, 1]))
    with pytest.raises(RuntimeError, match=r"packed x must be \[rows, I\]"):
        pos(args["data"].unsqueeze(0), batch_sizes)


# ---------------------------------------------------------------------------------------------------------
# The modules
# ---------------------------------------------------------------------------------------------------------
# The fp64 comparisons below (atol 1e-12 on outputs and states, 1e-11 on gradients, which sum over rows and
# layers) allow only for summation order: torch.nn's kernels and fusedrnn's GEMMs add the same products in a
# different order (~1e-15 relative each); a wrong row or a misplaced state is off by O(0.1).
MODULES = {
    "lstm": (torch.nn.LSTM, fusedrnn.LSTM, {}),
    "lstm-proj-2layers": (torch.nn.LSTM, fusedrnn.LSTM, dict(num_layers=2, proj_size=3)),
    "gru-bi-2layers": (torch.nn.GRU, fusedrnn.GRU, dict(num_layers=2, bidirectional=True)),
    "rnn-relu-bi": (torch.nn.RNN, fusedrnn.RNN, dict(nonlinearity="relu", bidirectional=True)),
    "lstm-bi-batch-first": (torch.nn.LSTM, fusedrnn.LSTM, dict(bidirectional=True, batch_first=True)),
}


@pytest.mark.parametrize("with_hx", [False, True], ids=["no-hx", "hx"])
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("module_id", list(MODULES))
def test_modules_on_packed_match_torch_nn_and_run_in_place(module_id, enforce_sorted, with_hx, monkeypatch):
    torch_cls, ours_cls, kw = MODULES[module_id]
    torch.manual_seed(0)
    ref = torch_cls(4, 5, **kw).double()
    ours = ours_cls(4, 5, **kw).double()
    ours.load_state_dict(ref.state_dict())
    T, B = 8, 5
    lengths = torch.tensor([3, 8, 1, 6, 8])
    if enforce_sorted:
        lengths = lengths.sort(descending=True).values
    x = torch.randn(B, T, 4, dtype=torch.float64) if kw.get("batch_first") else torch.randn(T, B, 4, dtype=torch.float64)
    packed = pack_padded_sequence(x, lengths, batch_first=bool(kw.get("batch_first")), enforce_sorted=enforce_sorted)
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    h_out = kw.get("proj_size") or 5
    hx = None
    if with_hx:
        h0 = torch.randn(layers, B, h_out, dtype=torch.float64)
        hx = (h0, torch.randn(layers, B, 5, dtype=torch.float64)) if torch_cls is torch.nn.LSTM else h0

    def run(module, leaf_data, leaf_hx):
        out, state = module(PackedSequence(leaf_data, packed.batch_sizes, packed.sorted_indices,
                                           packed.unsorted_indices), leaf_hx)
        states = state if isinstance(state, tuple) else (state,)
        return out, states

    def leaves():
        data = packed.data.clone().requires_grad_(True)
        if hx is None:
            return data, None
        h = tuple(t.clone().requires_grad_(True) for t in hx) if isinstance(hx, tuple) else hx.clone().requires_grad_(True)
        return data, h

    # the layers must run on the packed rows: no unpack
    monkeypatch.setattr(fnn, "_unpack", lambda *a: pytest.fail("the module unpacked the PackedSequence"))
    d_ref, hx_ref = leaves()
    d_ours, hx_ours = leaves()
    out_ref, st_ref = run(ref, d_ref, hx_ref)
    out_ours, st_ours = run(ours, d_ours, hx_ours)
    assert torch.equal(out_ours.batch_sizes, out_ref.batch_sizes)
    for a, b in ((out_ours.sorted_indices, out_ref.sorted_indices), (out_ours.unsorted_indices, out_ref.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)
    torch.testing.assert_close(out_ours.data, out_ref.data, rtol=0, atol=1e-12)
    for a, b in zip(st_ours, st_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    cot = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)  # noqa: E731
    cots = [cot(out_ref.data)] + [cot(s) for s in st_ref]
    loss = lambda out, st: sum((o * c).sum() for o, c in zip([out.data, *st], cots))  # noqa: E731
    inputs_ref = [d_ref, *(hx_ref if isinstance(hx_ref, tuple) else [hx_ref] if hx_ref is not None else []),
                  *ref.parameters()]
    inputs_ours = [d_ours, *(hx_ours if isinstance(hx_ours, tuple) else [hx_ours] if hx_ours is not None else []),
                   *ours.parameters()]
    grads_ref = torch.autograd.grad(loss(out_ref, st_ref), inputs_ref)
    grads_ours = torch.autograd.grad(loss(out_ours, st_ours), inputs_ours)
    for a, b in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_modules_record_the_packed_calls():
    lstm = fusedrnn.LSTM(3, 4, num_layers=2)
    packed = pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 2]))
    decisions = fusedrnn.explain(lstm, packed)
    assert decisions.backends == ["cpu", "cpu"]
    assert all("packed rows=7 T=5 B=2" in d.call for d in decisions), str(decisions)


def test_other_backends_and_transforms_unpack():
    """use_backend of another backend, the LayerNorm / zoneout cells and torch.func transforms keep the
    unpack path (and its results)."""
    torch.manual_seed(0)
    gru = fusedrnn.GRU(3, 4).double()
    packed = pack_padded_sequence(torch.randn(6, 3, 3, dtype=torch.float64), torch.tensor([6, 4, 1]))
    want = gru(packed)[0].data
    with fusedrnn.use_backend("reference"):
        decisions = fusedrnn.explain(gru, packed)
        assert decisions.backends == ["reference"] and "packed" not in decisions[0].call
        torch.testing.assert_close(gru(packed)[0].data, want, rtol=0, atol=1e-12)
    ln = fusedrnn.LayerNormGRU(3, 4)
    assert not ln._in_place_ok(packed.data, None, None, packed.batch_sizes)
    params = dict(gru.named_parameters())
    data = packed.data
    run = lambda p, d: torch.func.functional_call(  # noqa: E731
        gru, p, (PackedSequence(d, packed.batch_sizes),))[0].data.sum()
    grad = torch.func.grad(run, argnums=1)(params, data)
    data_leaf = data.clone().requires_grad_(True)
    gru(PackedSequence(data_leaf, packed.batch_sizes))[0].data.sum().backward()
    torch.testing.assert_close(grad, data_leaf.grad, rtol=0, atol=1e-12)


def test_packed_module_skips_ended_rows():
    """The packed call computes only the stored rows: its output has no row past a sequence's end to fill,
    and a batch of one long and many one-step sequences equals each sequence run alone."""
    torch.manual_seed(0)
    lstm = fusedrnn.LSTM(3, 4).double()
    x = torch.randn(9, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 1, 1])
    out, (h, c) = lstm(pack_padded_sequence(x, lengths))
    assert out.data.shape == (12, 4)
    for b in range(4):
        y_b, (h_b, c_b) = lstm(x[: lengths[b], b : b + 1])
        torch.testing.assert_close(pad_packed_sequence(out)[0][: lengths[b], b : b + 1], y_b, rtol=0, atol=1e-12)
        torch.testing.assert_close(h[:, b], h_b[:, 0], rtol=0, atol=1e-12)
        torch.testing.assert_close(c[:, b], c_b[:, 0], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# lengths= as a packed call (fusedrnn.nn._run_lengths_packed) and the layout op behind both
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("lengths", [[5, 5, 5, 5], [5, 2, 5, 1], [1], [3, 3, 1, 2, 3, 3, 2]],
                         ids=["full", "ties", "B1", "B7-ties"])
def test_packed_layout_op_is_torchs(lengths, enforce_sorted):
    lengths = torch.tensor(lengths)
    if enforce_sorted:
        lengths = lengths.sort(descending=True).values
    x = torch.randn(6, lengths.numel(), 2)
    want = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    batch_sizes, sorted_indices, unsorted_indices = torch.ops.fusedrnn.cpu_packed_layout(lengths.int(), 6,
                                                                                         enforce_sorted)
    assert torch.equal(batch_sizes, want.batch_sizes) and batch_sizes.dtype == torch.int64
    if enforce_sorted:
        assert sorted_indices.numel() == 0 and unsorted_indices.numel() == 0
    else:
        assert torch.equal(sorted_indices, want.sorted_indices)
        assert torch.equal(unsorted_indices, want.unsorted_indices)


def test_packed_layout_op_refuses_with_an_empty_layout():
    op = torch.ops.fusedrnn.cpu_packed_layout
    for lengths, T, enforce_sorted in (([3, 0], 4, False), ([5, 2], 4, False), ([2, 3], 4, True),
                                       ([], 4, False), ([-1, 2], 4, False)):
        assert op(torch.tensor(lengths, dtype=torch.int64), T, enforce_sorted)[0].numel() == 0
    with pytest.raises(RuntimeError, match=r"lengths: expected a 1-D integer CPU tensor"):
        op(torch.tensor([2.0, 1.0]), 4, False)


MODULES_LEN = {
    "lstm-proj": (fusedrnn.LSTM, dict(proj_size=3)),
    "gru-bi-2layers-batch-first": (fusedrnn.GRU, dict(num_layers=2, bidirectional=True, batch_first=True)),
    "rnn-tanh": (fusedrnn.RNN, {}),
}


@pytest.mark.parametrize("with_hx", [False, True], ids=["no-hx", "hx"])
@pytest.mark.parametrize("lengths", [[8, 2, 5, 1, 3], [4, 2, 3, 1, 4]], ids=["max-T", "max-below-T"])
@pytest.mark.parametrize("module_id", list(MODULES_LEN))
def test_lengths_run_packed_when_it_pays_and_match_the_padded_path(module_id, lengths, with_hx, monkeypatch):
    cls, kw = MODULES_LEN[module_id]
    torch.manual_seed(0)
    module = cls(4, 5, **kw).double()
    T, B = 8, 5
    x = torch.randn(B, T, 4, dtype=torch.float64) if kw.get("batch_first") else torch.randn(T, B, 4, dtype=torch.float64)
    lengths = torch.tensor(lengths)
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    hx = [torch.randn(layers, B, kw.get("proj_size") or 5, dtype=torch.float64)]
    if cls is fusedrnn.LSTM:
        hx.append(torch.randn(layers, B, 5, dtype=torch.float64))

    monkeypatch.setattr(fnn, "PACKING_MIN_MACS", 0)  # tiny sizes: the share of skipped rows decides

    def run(pays):
        monkeypatch.setattr(fnn, "PACKING_PAYS", pays)
        leaf = x.clone().requires_grad_(True)
        states0 = [t.clone().requires_grad_(True) for t in hx] if with_hx else []
        arg = None if not with_hx else tuple(states0) if len(states0) == 2 else states0[0]
        decisions = fusedrnn.explain(module, leaf, arg, lengths=lengths)
        y, state = module(leaf, arg, lengths=lengths)
        states = state if isinstance(state, tuple) else (state,)
        g = torch.Generator().manual_seed(1)
        outs = [y, *states]
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
        grads = torch.autograd.grad(loss, [leaf, *states0, *module.parameters()])
        return decisions, outs, grads

    packed_dec, packed_outs, packed_grads = run(0.85)
    padded_dec, padded_outs, padded_grads = run(0.0)
    assert all("packed" in d.call for d in packed_dec) and not any("packed" in d.call for d in padded_dec)
    for a, b in zip(packed_outs, padded_outs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    # zeros past each end, as the padded path gives (and torch.nn's unpacked output)
    y = packed_outs[0] if not kw.get("batch_first") else packed_outs[0].transpose(0, 1)
    for b, n in enumerate(lengths.tolist()):
        assert not y[n:, b].any()


def test_lengths_that_do_not_pay_or_cannot_pack_stay_padded(monkeypatch):
    gru = fusedrnn.GRU(3, 4)
    x = torch.randn(10, 4, 3)

    def packs(lengths, module=gru, x=x):  # explain() would run without autograd: record with it
        with fusedrnn.backends.recording_decisions() as decisions:
            module(x, lengths=torch.tensor(lengths))
        return all("packed" in d.call for d in decisions)
    # too little work skipped to pay for the packing: 24 rows of 84 multiply-adds
    assert not packs([10, 1, 3, 2])
    big = fusedrnn.GRU(64, 256)
    assert packs([10, 1, 3, 2], big, torch.randn(10, 4, 64))  # 24 rows x 3*256*320: 5.9M, x3 with backward
    with torch.no_grad():  # forward only: a third of that, under PACKING_MIN_MACS
        assert not packs([10, 1, 3, 2], big, torch.randn(10, 4, 64))
    monkeypatch.setattr(fnn, "PACKING_MIN_MACS", 0)
    for lengths in ([10, 10, 10, 9], [10, 0, 3, 2]):  # 97.5% of the rows; a length of 0 cannot be packed
        assert not packs(lengths), lengths
    assert packs([10, 1, 3, 2])
    # and the padded path's own errors for bad lengths
    with pytest.raises(ValueError, match=r"lengths: expected every length in \[0, 10\]"):
        gru(x, lengths=torch.tensor([11, 1, 3, 2]))
    with pytest.raises(TypeError, match=r"lengths: expected an integer dtype"):
        gru(x, lengths=torch.tensor([1.0, 1.0, 3.0, 2.0]))
