"""fusedrnn's modules against torch.nn's in fp64: outputs, final states, and the gradients of the input, the
initial states and every parameter; plus the torch.nn surface (state_dict, initialisation, repr, dtype and
device, dropout).

The grid is a covering set, not a cartesian product: every cell sees 1-3 layers, uni/bidirectional,
batch_first, bias=False, odd sizes (T=1, B=1, H=1, H=63) and each input form (padded, unbatched,
PackedSequence, lengths=) somewhere. Test ids read as shapes: lstm-L2-bi-T5xB3xI4-H6-P3-nobias-bf-hx.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fusedrnn
from helpers import assert_close_to_reference

F64 = torch.float64
# cell -> (class name in torch.nn and fusedrnn, extra constructor kwargs)
KINDS = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
         "rnn_relu": ("RNN", {"nonlinearity": "relu"})}


def make_modules(cell: str, I: int, H: int, **kw):
    """(torch.nn module, fusedrnn module) in fp64 with identical weights (torch's, loaded into fusedrnn)."""
    name, extra = KINDS[cell]
    torch_m = getattr(torch.nn, name)(I, H, dtype=F64, **extra, **kw)
    fused_m = getattr(fusedrnn, name)(I, H, dtype=F64, **extra, **kw)
    fused_m.load_state_dict(torch_m.state_dict())  # strict: same names and shapes
    return torch_m, fused_m


def cotangents(tensors, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g, dtype=F64) for t in tensors]


def loss_and_grads(outputs, inputs):
    """Backpropagates fixed random cotangents of `outputs`; returns the grads of `inputs` (None if unused)."""
    loss = sum((o * c).sum() for o, c in zip(outputs, cotangents(outputs)))
    return torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)


def assert_close(name, fused, ref):
    assert fused is not None and ref is not None, f"{name}: fused {fused is None}, torch {ref is None}"
    assert fused.dtype == ref.dtype, f"{name}: dtype {fused.dtype} != torch {ref.dtype}"
    assert_close_to_reference(name, fused, ref)


def state_tensors(state):
    return list(state) if isinstance(state, tuple) else [state]


def compare_params_grads(torch_m, fused_m, torch_grads, fused_grads):
    names = [n for n, _ in torch_m.named_parameters()]
    assert [n for n, _ in fused_m.named_parameters()] == names
    for n, gt, gf in zip(names, torch_grads, fused_grads):
        assert_close(f"grad {n}", gf, gt)


# ---------------------------------------------------------------------------------------------------------
# Layers: the covering grid
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    cell: str
    T: int
    B: int
    I: int
    H: int
    layers: int = 1
    bidir: bool = False
    proj: int = 0
    bias: bool = True
    batch_first: bool = False
    hx: bool = True
    form: str = "padded"  # padded | unbatched | packed | packed_sorted | lengths
    lengths: tuple = ()

    @property
    def id(self) -> str:
        shape = f"T{self.T}xI{self.I}" if self.form == "unbatched" else f"T{self.T}xB{self.B}xI{self.I}"
        parts = [self.cell, f"L{self.layers}", "bi" if self.bidir else "", shape, f"H{self.H}",
                 f"P{self.proj}" if self.proj else "", "" if self.bias else "nobias",
                 "bf" if self.batch_first else "", "hx" if self.hx else "", self.form,
                 ",".join(map(str, self.lengths))]
        return "-".join(p for p in parts if p)

    @property
    def kwargs(self) -> dict:
        kw = dict(num_layers=self.layers, bidirectional=self.bidir, bias=self.bias, batch_first=self.batch_first)
        if self.proj:
            kw["proj_size"] = self.proj
        return kw


C = Case
CASES = [
    # padded 3-D input
    C("lstm", 5, 3, 4, 6),
    C("lstm", 5, 3, 4, 6, layers=2, bidir=True, batch_first=True),
    C("lstm", 4, 2, 3, 5, layers=3, bidir=True, proj=3, bias=False, hx=False),
    C("lstm", 1, 1, 1, 1, layers=2),
    C("lstm", 3, 3, 5, 63, proj=7, batch_first=True),
    C("lstm", 6, 1, 2, 63, layers=2, bidir=True, hx=False),
    C("gru", 5, 3, 4, 6),
    C("gru", 4, 3, 5, 7, layers=2, bidir=True, batch_first=True, bias=False),
    C("gru", 1, 1, 1, 1, layers=3, hx=False),
    C("gru", 3, 3, 2, 63, bidir=True),
    C("rnn_tanh", 5, 3, 4, 6, layers=3, hx=False),
    C("rnn_tanh", 1, 1, 1, 1, bidir=True, bias=False),
    C("rnn_tanh", 4, 3, 5, 63, layers=2, batch_first=True),
    C("rnn_relu", 5, 3, 4, 6, layers=2, bidir=True),
    C("rnn_relu", 1, 1, 3, 1, batch_first=True, hx=False),
    C("rnn_relu", 3, 3, 2, 63, layers=3, bias=False),
    # unbatched 2-D input, with and without hx
    C("lstm", 5, 1, 4, 6, layers=2, bidir=True, form="unbatched"),
    C("lstm", 3, 1, 3, 5, proj=2, hx=False, form="unbatched"),
    C("gru", 4, 1, 3, 5, form="unbatched"),
    C("gru", 1, 1, 2, 1, layers=2, bidir=True, hx=False, form="unbatched"),
    C("rnn_tanh", 4, 1, 3, 5, layers=2, batch_first=True, form="unbatched"),
    C("rnn_relu", 4, 1, 3, 5, bidir=True, hx=False, form="unbatched"),
    # PackedSequence in -> PackedSequence out, unsorted lengths (enforce_sorted=False)
    C("lstm", 5, 4, 3, 5, layers=2, bidir=True, form="packed", lengths=(3, 5, 1, 4)),
    C("lstm", 4, 4, 3, 5, proj=2, batch_first=True, hx=False, form="packed", lengths=(2, 4, 4, 1)),
    C("gru", 5, 4, 3, 5, layers=2, bidir=True, form="packed", lengths=(1, 2, 5, 3)),
    C("rnn_tanh", 4, 3, 2, 4, hx=False, form="packed", lengths=(2, 4, 3)),
    C("rnn_relu", 5, 4, 3, 4, layers=2, bidir=True, bias=False, form="packed", lengths=(5, 1, 1, 3)),
    C("lstm", 5, 3, 3, 4, bidir=True, form="packed_sorted", lengths=(5, 3, 2)),
    # padded input + lengths= against torch fed the equivalent PackedSequence (max length < T in most)
    C("lstm", 5, 3, 4, 6, layers=2, bidir=True, batch_first=True, form="lengths", lengths=(4, 1, 3)),
    C("lstm", 5, 3, 4, 6, proj=3, bidir=True, hx=False, form="lengths", lengths=(4, 2, 5)),
    C("gru", 6, 4, 3, 5, layers=2, bidir=True, form="lengths", lengths=(2, 5, 1, 3)),
    C("rnn_tanh", 4, 2, 3, 5, batch_first=True, form="lengths", lengths=(1, 3)),
    C("rnn_relu", 4, 3, 2, 4, layers=3, bidir=True, bias=False, form="lengths", lengths=(3, 3, 2)),
]


def make_inputs(case: Case, torch_m):
    g = torch.Generator().manual_seed(123)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=F64).requires_grad_()  # noqa: E731
    if case.form == "unbatched":
        x = randn(case.T, case.I)
    else:
        x = randn(case.B, case.T, case.I) if case.batch_first else randn(case.T, case.B, case.I)
    hx = []
    if case.hx:
        lead = (case.layers * (2 if case.bidir else 1),) + (() if case.form == "unbatched" else (case.B,))
        hx.append(randn(*lead, case.proj or case.H))
        if case.cell == "lstm":
            hx.append(randn(*lead, case.H))
    return x, hx


def hx_arg(case, hx):
    if not hx:
        return None
    return tuple(hx) if case.cell == "lstm" else hx[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_layers_match_torch(case: Case):
    torch_m, fused_m = make_modules(case.cell, case.I, case.H, **case.kwargs)
    x, hx = make_inputs(case, torch_m)
    hx_in = hx_arg(case, hx)

    if case.form in ("packed", "packed_sorted"):
        packed = pack_padded_sequence(x, list(case.lengths), batch_first=case.batch_first,
                                      enforce_sorted=case.form == "packed_sorted")
        out_t, state_t = torch_m(packed, hx_in)
        out_f, state_f = fused_m(packed, hx_in)
        assert isinstance(out_f, PackedSequence)
        assert torch.equal(out_f.batch_sizes, out_t.batch_sizes)
        for attr in ("sorted_indices", "unsorted_indices"):
            a, b = getattr(out_f, attr), getattr(out_t, attr)
            assert (a is None and b is None) or torch.equal(a, b), attr
        outs_t, outs_f = [out_t.data], [out_f.data]
    elif case.form == "lengths":
        lengths = torch.tensor(case.lengths) if case.cell != "gru" else list(case.lengths)  # both forms
        out_f, state_f = fused_m(x, hx_in, lengths=lengths)
        packed = pack_padded_sequence(x, list(case.lengths), batch_first=case.batch_first, enforce_sorted=False)
        out_tp, state_t = torch_m(packed, hx_in)
        out_t, _ = pad_packed_sequence(out_tp, batch_first=case.batch_first, total_length=case.T)
        # padded positions are exactly zero
        time_dim = 1 if case.batch_first else 0
        steps = torch.arange(case.T).unsqueeze(1 - time_dim)
        pad = (steps >= torch.tensor(case.lengths).unsqueeze(time_dim)).unsqueeze(-1).expand_as(out_f)
        assert pad.any()
        assert (out_f.detach()[pad] == 0).all()
        outs_t, outs_f = [out_t], [out_f]
    else:
        out_t, state_t = torch_m(x, hx_in)
        out_f, state_f = fused_m(x, hx_in)
        outs_t, outs_f = [out_t], [out_f]

    outs_t += state_tensors(state_t)
    outs_f += state_tensors(state_f)
    assert isinstance(state_f, tuple) == isinstance(state_t, tuple)
    names = ["output", "h_n", "c_n"]
    for name, f, t in zip(names, outs_f, outs_t):
        assert_close(name, f, t)

    inputs_t = [x] + hx + list(torch_m.parameters())
    inputs_f = [x] + hx + list(fused_m.parameters())
    grads_t = loss_and_grads(outs_t, inputs_t)
    grads_f = loss_and_grads(outs_f, inputs_f)
    for name, gf, gt in zip(["x", "h0", "c0"], grads_f, grads_t[:1 + len(hx)]):
        assert_close(f"grad {name}", gf, gt)
    compare_params_grads(torch_m, fused_m, grads_t[1 + len(hx):], grads_f[1 + len(hx):])


@pytest.mark.parametrize("cell", list(KINDS))
def test_lengths_zero_keeps_initial_state(cell):
    """A zero length (which a PackedSequence cannot express) yields zero output and h_n = h0 in every
    direction; the other sequences are unaffected by it."""
    T, B, I, H = 4, 3, 3, 5
    torch_m, fused_m = make_modules(cell, I, H, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, dtype=F64)
    h0 = torch.randn(4, B, H, dtype=F64)
    hx = (h0, torch.randn(4, B, H, dtype=F64)) if cell == "lstm" else h0
    out, state = fused_m(x, hx, lengths=[4, 0, 2])
    assert (out[:, 1] == 0).all()
    for s, s0 in zip(state_tensors(state), state_tensors(hx)):
        assert torch.equal(s[:, 1], s0[:, 1])
    keep = [0, 2]
    sub_hx = tuple(s[:, keep] for s in hx) if cell == "lstm" else h0[:, keep]
    out_t, state_t = torch_m(pack_padded_sequence(x[:, keep], [4, 2]), sub_hx)
    out_t, _ = pad_packed_sequence(out_t, total_length=T)
    assert_close("output", out[:, keep], out_t)
    for s, st in zip(state_tensors(state), state_tensors(state_t)):
        assert_close("state", s[:, keep], st)


# ---------------------------------------------------------------------------------------------------------
# state_dict, initialisation, repr
# ---------------------------------------------------------------------------------------------------------
CONSTRUCTIONS = [
    ("LSTM", (3, 5), dict(num_layers=2, bidirectional=True, proj_size=2)),
    ("LSTM", (3, 5), dict(bias=False, batch_first=True)),
    ("GRU", (4, 6), dict(num_layers=3, dropout=0.25)),
    ("RNN", (2, 3), dict(nonlinearity="relu", bidirectional=True, bias=False)),
    ("RNN", (2, 3), dict(num_layers=2)),
    ("LSTMCell", (3, 5), {}),
    ("GRUCell", (3, 5), dict(bias=False)),
    ("RNNCell", (3, 5), dict(nonlinearity="relu")),
    ("RNNCell", (3, 5), dict(nonlinearity="tanh", bias=False)),
]
CONSTRUCTION_IDS = [f"{n}({','.join(map(str, a))}{''.join(f',{k}={v}' for k, v in kw.items())})"
                    for n, a, kw in CONSTRUCTIONS]


@pytest.mark.parametrize("name,args,kw", CONSTRUCTIONS, ids=CONSTRUCTION_IDS)
def test_same_seed_same_init_and_state_dict(name, args, kw):
    torch.manual_seed(7)
    torch_m = getattr(torch.nn, name)(*args, **kw)
    torch.manual_seed(7)
    fused_m = getattr(fusedrnn, name)(*args, **kw)
    sd_t, sd_f = torch_m.state_dict(), fused_m.state_dict()
    assert list(sd_f) == list(sd_t)  # keys and order
    for k in sd_t:
        assert sd_f[k].shape == sd_t[k].shape and sd_f[k].dtype == sd_t[k].dtype, k
        assert torch.equal(sd_f[k], sd_t[k]), k
    assert [n for n, _ in fused_m.named_parameters()] == [n for n, _ in torch_m.named_parameters()]
    if hasattr(torch_m, "all_weights"):
        assert [[w.shape for w in ws] for ws in fused_m.all_weights] == \
            [[w.shape for w in ws] for ws in torch_m.all_weights]
        assert fused_m._flat_weights_names == torch_m._flat_weights_names
    # reset_parameters draws the same way too
    torch.manual_seed(8)
    torch_m.reset_parameters()
    torch.manual_seed(8)
    fused_m.reset_parameters()
    for (k, a), b in zip(fused_m.state_dict().items(), torch_m.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name,args,kw", CONSTRUCTIONS, ids=CONSTRUCTION_IDS)
def test_repr_equals_torch(name, args, kw):
    assert repr(getattr(fusedrnn, name)(*args, **kw)) == repr(getattr(torch.nn, name)(*args, **kw))


@pytest.mark.parametrize("cell", list(KINDS))
def test_state_dict_loads_into_torch(cell):
    """fusedrnn -> torch.nn direction (the other one is used by every comparison above)."""
    name, extra = KINDS[cell]
    kw = dict(num_layers=2, bidirectional=True, **extra)
    if cell == "lstm":
        kw["proj_size"] = 3
    fused_m = getattr(fusedrnn, name)(4, 5, dtype=F64, **kw)
    torch_m = getattr(torch.nn, name)(4, 5, dtype=F64, **kw)
    torch_m.load_state_dict(fused_m.state_dict())  # strict
    x = torch.randn(3, 2, 4, dtype=F64)
    out_f, state_f = fused_m(x)
    out_t, state_t = torch_m(x)
    assert_close("output", out_f, out_t)
    for f, t in zip(state_tensors(state_f), state_tensors(state_t)):
        assert_close("state", f, t)


# ---------------------------------------------------------------------------------------------------------
# dtype and device
# ---------------------------------------------------------------------------------------------------------
def test_to_dtype():
    torch.manual_seed(3)
    fused_m = fusedrnn.LSTM(3, 6, num_layers=2, proj_size=2, bidirectional=True)
    torch_m = torch.nn.LSTM(3, 6, num_layers=2, proj_size=2, bidirectional=True)
    torch_m.load_state_dict(fused_m.state_dict())
    assert fused_m.to(F64) is fused_m
    torch_m.to(F64)
    assert all(p.dtype == F64 for p in fused_m.parameters())
    x = torch.randn(4, 2, 3, dtype=F64)
    out_f, (h_f, c_f) = fused_m(x)
    out_t, (h_t, c_t) = torch_m(x)
    for name, f, t in [("output", out_f, out_t), ("h_n", h_f, h_t), ("c_n", c_f, c_t)]:
        assert_close(name, f, t)
    # back to fp32: the fp32 result is within the fp32 bound of the fp64 torch result
    fused_m.float()
    assert all(p.dtype == torch.float32 for p in fused_m.parameters())
    out32, (h32, c32) = fused_m(x.float())
    assert out32.dtype == h32.dtype == c32.dtype == torch.float32
    for name, f, t in [("output", out32, out_t), ("h_n", h32, h_t), ("c_n", c32, c_t)]:
        assert_close_to_reference(name, f, t)


@pytest.mark.parametrize("name,args,kw", CONSTRUCTIONS, ids=CONSTRUCTION_IDS)
def test_dtype_and_device_constructor_args(name, args, kw):
    m = getattr(fusedrnn, name)(*args, dtype=F64, device="cpu", **kw)
    assert all(p.dtype == F64 and p.device.type == "cpu" for p in m.parameters())
    # the meta device: parameters there, and a forward on meta tensors gives torch's shapes
    fused_meta = getattr(fusedrnn, name)(*args, device=torch.device("meta"), dtype=F64, **kw)
    torch_meta = getattr(torch.nn, name)(*args, device="meta", dtype=F64, **kw)
    assert all(p.device.type == "meta" and p.dtype == F64 for p in fused_meta.parameters())
    I = args[0]
    is_cell = name.endswith("Cell")
    x = torch.empty((2, I) if is_cell else (4, 2, I), device="meta", dtype=F64)
    out_f, out_t = fused_meta(x), torch_meta(x)
    flat = lambda o: [t for t in (o if isinstance(o, tuple) else (o,)) for t in  # noqa: E731
                      (t if isinstance(t, tuple) else (t,))]
    assert [(t.shape, t.device, t.dtype) for t in flat(out_f)] == [(t.shape, t.device, t.dtype) for t in flat(out_t)]


# ---------------------------------------------------------------------------------------------------------
# Dropout between layers
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", list(KINDS))
def test_dropout_eval_mode_is_identity(cell):
    torch_m, fused_m = make_modules(cell, 3, 5, num_layers=3, dropout=0.5)
    torch_m.eval()
    fused_m.eval()
    x = torch.randn(4, 2, 3, dtype=F64)
    out_f, state_f = fused_m(x)
    out_t, state_t = torch_m(x)
    assert_close("output", out_f, out_t)
    for f, t in zip(state_tensors(state_f), state_tensors(state_t)):
        assert_close("state", f, t)
    assert torch.equal(fused_m(x)[0], out_f)  # deterministic


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_dropout_one_train_mode_matches_torch(cell):
    """dropout=1.0 in training: every layer above the first sees zeros, exactly as in torch."""
    torch_m, fused_m = make_modules(cell, 3, 5, num_layers=3, dropout=1.0, bidirectional=cell == "gru")
    torch_m.train()
    fused_m.train()
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    out_f, state_f = fused_m(x)
    out_t, state_t = torch_m(x)
    outs_f, outs_t = [out_f] + state_tensors(state_f), [out_t] + state_tensors(state_t)
    for name, f, t in zip(["output", "h_n", "c_n"], outs_f, outs_t):
        assert_close(name, f, t)
    # the top layer saw zeros: its output is that of a zero input, the same for every batch element
    assert_close("batch element 1 vs 0", out_f[:, 1], out_f[:, 0])
    grads_f = loss_and_grads(outs_f, [x] + list(fused_m.parameters()))
    grads_t = loss_and_grads(outs_t, [x] + list(torch_m.parameters()))
    assert_close("grad x", grads_f[0], grads_t[0])
    compare_params_grads(torch_m, fused_m, grads_t[1:], grads_f[1:])


def test_dropout_half_train_mode_is_statistical(monkeypatch):
    """p=0.5 in training: the second layer's input is the first layer's output with about half of the entries
    zeroed and the rest scaled by 2; the output changes between calls; eval mode does not drop."""
    from fusedrnn import nn as fnn
    seen = []
    real = fnn.rnn_layer

    def spy(cell, x, *args, **kwargs):
        out = real(cell, x, *args, **kwargs)
        seen.append((x.detach(), out[0].detach()))
        return out

    monkeypatch.setattr(fnn, "rnn_layer", spy)
    # fusedrnn's own layer loop (a module that goes to torch's kernels whole applies torch's dropout inside)
    monkeypatch.setenv("FUSEDRNN_BACKEND", "reference")
    m = fusedrnn.LSTM(8, 32, num_layers=2, dropout=0.5, dtype=F64)
    x = torch.randn(10, 8, 8, dtype=F64)
    m.train()
    out1, _ = m(x)
    (_, y0), (x1, _) = seen
    kept = x1 != 0
    frac = kept.double().mean().item()  # 2560 Bernoulli(0.5) draws: sd ~ 0.01
    assert 0.44 < frac < 0.56, frac
    assert torch.allclose(x1[kept], 2 * y0[kept], rtol=0, atol=1e-15)
    out2, _ = m(x)
    assert not torch.allclose(out1, out2)
    m.eval()
    seen.clear()
    out3, _ = m(x)
    (_, y0), (x1, _) = seen
    assert torch.equal(x1, y0)
    assert torch.equal(m(x)[0], out3)
    assert not torch.allclose(out1, out3) and not torch.allclose(out2, out3)


def test_dropout_single_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        torch.nn.LSTM(3, 4, dropout=0.5)
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        fusedrnn.LSTM(3, 4, dropout=0.5)


# ---------------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------------
CELL_CLASSES = {"lstm": ("LSTMCell", {}), "gru": ("GRUCell", {}), "rnn_tanh": ("RNNCell", {"nonlinearity": "tanh"}),
                "rnn_relu": ("RNNCell", {"nonlinearity": "relu"})}


@dataclass(frozen=True)
class CellCase:
    cell: str
    B: Optional[int]  # None: unbatched 1-D input
    I: int
    H: int
    hx: bool = True
    bias: bool = True

    @property
    def id(self) -> str:
        shape = f"I{self.I}" if self.B is None else f"B{self.B}xI{self.I}"
        return "-".join(p for p in [self.cell + "cell", shape, f"H{self.H}", "" if self.bias else "nobias",
                                    "hx" if self.hx else "hxNone"] if p)


CELL_CASES = [
    CellCase("lstm", 3, 4, 6), CellCase("lstm", 3, 4, 6, hx=False), CellCase("lstm", None, 4, 6),
    CellCase("lstm", None, 3, 5, hx=False), CellCase("lstm", 1, 1, 1, bias=False), CellCase("lstm", 2, 5, 63),
    CellCase("gru", 3, 4, 6), CellCase("gru", 3, 4, 6, hx=False), CellCase("gru", None, 4, 6),
    CellCase("gru", None, 3, 5, hx=False), CellCase("gru", 1, 1, 1, bias=False), CellCase("gru", 2, 5, 63),
    CellCase("rnn_tanh", 3, 4, 6), CellCase("rnn_tanh", None, 4, 6, hx=False),
    CellCase("rnn_tanh", 1, 1, 1, bias=False),
    CellCase("rnn_relu", 3, 4, 63), CellCase("rnn_relu", None, 4, 6), CellCase("rnn_relu", 3, 4, 6, hx=False),
]


@pytest.mark.parametrize("case", CELL_CASES, ids=[c.id for c in CELL_CASES])
def test_cells_match_torch(case: CellCase):
    name, extra = CELL_CLASSES[case.cell]
    torch_m = getattr(torch.nn, name)(case.I, case.H, bias=case.bias, dtype=F64, **extra)
    fused_m = getattr(fusedrnn, name)(case.I, case.H, bias=case.bias, dtype=F64, **extra)
    fused_m.load_state_dict(torch_m.state_dict())
    lead = () if case.B is None else (case.B,)
    x = torch.randn(*lead, case.I, dtype=F64, requires_grad=True)
    hx = [torch.randn(*lead, case.H, dtype=F64, requires_grad=True)
          for _ in range(2 if case.cell == "lstm" else 1)] if case.hx else []
    hx_in = (tuple(hx) if case.cell == "lstm" else hx[0]) if hx else None
    outs_t, outs_f = state_tensors(torch_m(x, hx_in)), state_tensors(fused_m(x, hx_in))
    assert len(outs_f) == len(outs_t)
    for n, f, t in zip(["h_1", "c_1"], outs_f, outs_t):
        assert f.shape == t.shape == (*lead, case.H)
        assert_close(n, f, t)
    grads_t = loss_and_grads(outs_t, [x] + hx + list(torch_m.parameters()))
    grads_f = loss_and_grads(outs_f, [x] + hx + list(fused_m.parameters()))
    for n, gf, gt in zip(["x", "h0", "c0"], grads_f, grads_t[:1 + len(hx)]):
        assert_close(f"grad {n}", gf, gt)
    compare_params_grads(torch_m, fused_m, grads_t[1 + len(hx):], grads_f[1 + len(hx):])

