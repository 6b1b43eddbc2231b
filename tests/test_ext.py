"""LayerNorm LSTM / GRU, zoneout and DropConnect (issue #18): the op fusedrnn::rnn_layer_ext against its spec
(fusedrnn.reference.rnn_layer_ext) on every backend that can run here, and the modules built on it.

Per-backend row-kernel tests live beside their kernels' tests (test_ext_cpu.py, test_ext_triton.py,
test_ext_cuda.py); this file checks the whole op and the module semantics."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from fusedrnn import functional, reference
from fusedrnn.backends import ext as ext_backend
from helpers import assert_close_to_reference, cast_args, max_error

EXT_PARAMS = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "ln_ih", "ln_hh", "ln_c_weight", "ln_c_bias")


def make_ext_args(cell, T, B, I, H, layer_norm=True, zoneout=True, bias=True, lengths=None, reverse=False,
                  seed=0, dtype=torch.float64):
    """Keyword arguments of reference.rnn_layer_ext / functional.rnn_layer_ext (fp64 leaves)."""
    g = torch.Generator().manual_seed(seed)
    G = reference.GATES[cell]
    k = 1 / H ** 0.5
    uni = lambda *s: ((torch.rand(*s, generator=g, dtype=torch.float64) * 2 - 1) * k)  # noqa: E731
    normal = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    gain = lambda n: 1 + 0.3 * normal(n)  # noqa: E731
    lstm = cell == "lstm"
    args = dict(x=normal(T, B, I), h0=normal(B, H) * 0.5, c0=normal(B, H) * 0.5 if lstm else None,
                w_ih=uni(G * H, I), w_hh=uni(G * H, H), b_ih=uni(G * H) if bias else None,
                b_hh=uni(G * H) if bias else None, ln_ih=gain(G * H) if layer_norm else None,
                ln_hh=gain(G * H) if layer_norm else None, ln_c_weight=gain(H) if layer_norm and lstm else None,
                ln_c_bias=0.2 * normal(H) if layer_norm and lstm else None)
    args = {n: None if t is None else t.to(dtype).requires_grad_() for n, t in args.items()}
    keep = lambda: (torch.rand(T, B, H, generator=g) < 0.3).to(dtype)  # noqa: E731
    args["zoneout_h"] = keep() if zoneout else None
    args["zoneout_c"] = keep() if zoneout and lstm else None
    args["reverse"] = reverse
    args["lengths"] = None if lengths is None else torch.tensor(lengths)
    return args


def run_and_grad(fn, args, seed=1):
    outs = [o for o in fn(**args) if o is not None]
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
    leaves = {n: args[n] for n in EXT_PARAMS if args[n] is not None}
    return outs, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def spec(cell):
    return lambda **a: reference.rnn_layer_ext(cell, **a)


def kernels(cell):
    return lambda **a: functional.rnn_layer_ext(cell, **a)


def ext_backends():
    """Backends with ext row kernels that run here at test speed (triton and cuda-emu: their own files)."""
    names = ["reference"]
    try:
        rows = ext_backend.row_kernels("cpu")
        if rows.unavailable_reason(torch.device("cpu")) is None:
            names.append("cpu")
    except ImportError:
        pass
    return names


CASES = [  # (cell, layer_norm, zoneout, bias, lengths, reverse)
    (cell, ln, zo, bias, lengths, reverse)
    for cell, (ln, zo), bias, (lengths, reverse) in itertools.product(
        ("lstm", "gru"), ((True, True), (True, False), (False, True)), (True, False),
        ((None, False), ([5, 1, 3], True), ([4, 5, 0], False)))
]


@pytest.mark.parametrize("backend", ext_backends())
@pytest.mark.parametrize("cell,layer_norm,zoneout,bias,lengths,reverse", CASES)
def test_op_matches_spec_fp64(backend, cell, layer_norm, zoneout, bias, lengths, reverse):
    """Outputs, final states and the gradient of every input and parameter, in fp64."""
    args = make_ext_args(cell, 5, 3, 4, 7, layer_norm, zoneout, bias, lengths, reverse)
    ref_out, ref_grads = run_and_grad(spec(cell), args)
    with fusedrnn.use_backend(backend):
        out, grads = run_and_grad(kernels(cell), args)
    for name, o, r in zip(("y", "h_n", "c_n"), out, ref_out):
        assert max_error(o, r) <= 1e-12, name
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert max_error(g, ref_grads[name]) <= 1e-11 * max(1.0, ref_grads[name].abs().max().item()), name


@pytest.mark.parametrize("backend", ext_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_op_low_precision(backend, dtype, cell):
    """Each dtype against the fp64 spec, within FACTOR x the spec's own error at that dtype (tests/helpers)."""
    rows = ext_backend.row_kernels(backend)
    if rows.unsupported_reason(cell, dtype, 33) is not None:
        pytest.skip(rows.unsupported_reason(cell, dtype, 33))
    args64 = make_ext_args(cell, 6, 3, 5, 33, lengths=[6, 2, 4])
    ref_out, ref_grads = run_and_grad(spec(cell), args64)
    low = cast_args(args64, dtype)
    native_out = native_grads = None
    if dtype != torch.float32:
        native_out, native_grads = run_and_grad(lambda **a: reference.rnn_layer_ext(cell, **a, compute_dtype=dtype),
                                                cast_args(args64, dtype))
    with fusedrnn.use_backend(backend):
        out, grads = run_and_grad(kernels(cell), low)
    for i, (o, r) in enumerate(zip(out, ref_out)):
        assert o.dtype == dtype
        assert_close_to_reference(("y", "h_n", "c_n")[i], o, r, native_out[i] if native_out else None)
    for name, g in grads.items():
        assert g.dtype == dtype
        assert_close_to_reference(f"grad {name}", g, ref_grads[name], native_grads[name] if native_grads else None)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradcheck_and_gradgradcheck(cell):
    args = make_ext_args(cell, 2, 2, 2, 3, lengths=[2, 1])
    names = [n for n in EXT_PARAMS if args[n] is not None]
    rest = {n: v for n, v in args.items() if n not in names}

    def fn(*tensors):
        out = functional.rnn_layer_ext(cell, **dict(zip(names, tensors)), **rest)
        return tuple(o for o in out if o is not None)
    inputs = tuple(args[n] for n in names)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_without_norms_and_masks_it_is_the_plain_cell():
    """rnn_layer_ext with no norm and no zoneout is exactly torch.nn's cell (the spec of rnn_layer)."""
    for cell in ("lstm", "gru"):
        args = make_ext_args(cell, 4, 2, 3, 5, layer_norm=False, zoneout=False)
        plain = {n: args[n] for n in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")}
        want = reference.rnn_layer(cell, **plain)
        got = functional.rnn_layer_ext(cell, **args)
        for g, w in zip(got, want):
            assert (g is None and w is None) or max_error(g, w) <= 1e-13


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------
def spec_module(module, x, h0, c0, lengths=None, dropconnect_masks=None, zoneout_draws=False):
    """What `module` computes, from the spec: each layer and direction one reference.rnn_layer_ext call.
    zoneout_draws / dropconnect: draw the masks from the default generator in the module's order."""
    D = 2 if module.bidirectional else 1
    layer_input, h_n, c_n = x, [], []
    for layer in range(module.num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh, _ = module._layer_weights(layer, d)
            if module.training and module.dropconnect > 0:
                w_hh = F.dropout(w_hh, module.dropconnect, training=True)
            zh = zc = None
            if module.training and zoneout_draws:
                shape = (x.shape[0], x.shape[1], module.hidden_size)
                p_h, p_c = module.zoneout
                zh = torch.empty(shape).bernoulli_(p_h) if p_h else None
                zc = torch.empty(shape).bernoulli_(p_c) if p_c and module.cell == "lstm" else None
            y, h, c = reference.rnn_layer_ext(module.cell, layer_input, h0[k], None if c0 is None else c0[k], w_ih,
                                              w_hh, b_ih, b_hh, *module._layer_norms(layer, d), zh, zc, d == 1,
                                              lengths)
            outs.append(y)
            h_n.append(h)
            c_n.append(c)
        layer_input = outs[0] if D == 1 else torch.cat(outs, -1)
    return layer_input, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None)


@pytest.mark.parametrize("cls", [fusedrnn.LayerNormLSTM, fusedrnn.LayerNormGRU])
def test_layernorm_module_matches_spec(cls):
    torch.manual_seed(0)
    m = cls(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.2 * torch.randn_like(p))  # away from the initial 1 / 0
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 1, 5])
    lstm = cls is fusedrnn.LayerNormLSTM
    h0 = torch.randn(4, 4, 5, dtype=torch.float64)
    c0 = torch.randn(4, 4, 5, dtype=torch.float64) if lstm else None
    got_y, got_state = m(x, (h0, c0) if lstm else h0, lengths=lengths)
    want_y, want_h, want_c = spec_module(m, x, h0, c0, lengths)
    assert max_error(got_y, want_y) <= 1e-12
    assert max_error(got_state[0] if lstm else got_state, want_h) <= 1e-12
    if lstm:
        assert max_error(got_state[1], want_c) <= 1e-12
    # every parameter's gradient
    params = list(m.parameters())
    g_got = torch.autograd.grad(got_y.sum(), params)
    g_want = torch.autograd.grad(want_y.sum(), params)
    for (name, _), a, b in zip(m.named_parameters(), g_got, g_want):
        assert max_error(a, b) <= 1e-11, name


def test_layernorm_state_dict_names_and_init():
    m = fusedrnn.LayerNormLSTM(3, 5, num_layers=2, bidirectional=True)
    names = list(m.state_dict())
    for suffix in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        for stem in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "ln_ih_weight", "ln_hh_weight", "ln_c_weight",
                     "ln_c_bias"):
            assert stem + suffix in names
    assert m.ln_ih_weight_l0.shape == (20,) and m.ln_c_weight_l1.shape == (5,)
    assert torch.equal(m.ln_hh_weight_l1_reverse, torch.ones(20)) and torch.equal(m.ln_c_bias_l0, torch.zeros(5))
    g = fusedrnn.LayerNormGRU(3, 5)
    assert sorted(n for n in g.state_dict() if n.startswith("ln_")) == ["ln_hh_weight_l0", "ln_ih_weight_l0"]
    # the torch.nn weights draw exactly as torch.nn's (same seed, same values)
    torch.manual_seed(3)
    ours = fusedrnn.LayerNormGRU(3, 5, num_layers=2)
    torch.manual_seed(3)
    theirs = torch.nn.GRU(3, 5, num_layers=2)
    for name, p in theirs.named_parameters():
        assert torch.equal(getattr(ours, name), p), name


def test_layernorm_module_packed_and_batch_first_and_unbatched():
    torch.manual_seed(0)
    m = fusedrnn.LayerNormLSTM(3, 4, batch_first=True, dtype=torch.float64)
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    y_len, (h_len, c_len) = m(x, lengths=lengths)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    y_packed, (h_packed, c_packed) = m(packed)
    y_unpacked, _ = torch.nn.utils.rnn.pad_packed_sequence(y_packed, batch_first=True)
    assert max_error(y_unpacked, y_len) <= 1e-13 and max_error(h_packed, h_len) <= 1e-13
    y1, (h1, c1) = m(x[1])  # unbatched
    assert max_error(y1, m(x[1:2])[0][0]) <= 1e-13


@pytest.mark.parametrize("cls", [fusedrnn.LayerNormLSTMCell, fusedrnn.LayerNormGRUCell])
def test_layernorm_cells_are_one_layer_step(cls):
    torch.manual_seed(0)
    cell = cls(3, 5, dtype=torch.float64)
    layer_cls = fusedrnn.LayerNormLSTM if cls is fusedrnn.LayerNormLSTMCell else fusedrnn.LayerNormGRU
    layer = layer_cls(3, 5, dtype=torch.float64)
    layer.load_state_dict({f"{k}_l0": v for k, v in cell.state_dict().items()})
    x = torch.randn(2, 3, dtype=torch.float64)
    if cls is fusedrnn.LayerNormLSTMCell:
        h, c = cell(x)
        _, (h_n, c_n) = layer(x.unsqueeze(0))
        assert max_error(h, h_n[0]) <= 1e-13 and max_error(c, c_n[0]) <= 1e-13
    else:
        h = cell(x)
        _, h_n = layer(x.unsqueeze(0))
        assert max_error(h, h_n[0]) <= 1e-13


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn", "ln_lstm", "ln_gru"])
def test_zoneout_and_dropconnect_are_identity_in_eval(kind):
    """In eval the regularised module computes exactly the unregularised one (torch.nn's for plain cells)."""
    torch.manual_seed(0)
    make = {"lstm": lambda **k: fusedrnn.LSTM(3, 5, num_layers=2, **k),
            "gru": lambda **k: fusedrnn.GRU(3, 5, num_layers=2, **k),
            "rnn": lambda **k: fusedrnn.RNN(3, 5, num_layers=2, **{n: v for n, v in k.items() if n != "zoneout"}),
            "ln_lstm": lambda **k: fusedrnn.LayerNormLSTM(3, 5, num_layers=2, **k),
            "ln_gru": lambda **k: fusedrnn.LayerNormGRU(3, 5, num_layers=2, **k)}[kind]
    regularised = make(zoneout=0.3, dropconnect=0.4).eval()
    plain = make().eval()
    plain.load_state_dict(regularised.state_dict())
    x = torch.randn(7, 2, 3)
    assert torch.equal(regularised(x)[0], plain(x)[0])
    if kind in ("lstm", "gru", "rnn"):
        torch_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind]
        ref = torch_cls(3, 5, num_layers=2).eval()
        ref.load_state_dict(regularised.state_dict())
        assert max_error(regularised(x)[0], ref(x)[0]) <= 1e-6
    regularised.train()
    assert not torch.equal(regularised(x)[0], plain(x)[0])  # and they do something in training


@pytest.mark.parametrize("kind", ["lstm", "gru", "ln_lstm", "ln_gru"])
def test_training_is_the_spec_with_the_drawn_masks_and_reproducible(kind):
    """In training the module equals the spec run with the masks it draws (same generator, same order), and
    the same seed gives the same result."""
    cls = {"lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU, "ln_lstm": fusedrnn.LayerNormLSTM,
           "ln_gru": fusedrnn.LayerNormGRU}[kind]
    zoneout = (0.2, 0.4) if kind.endswith("lstm") else 0.25
    torch.manual_seed(0)
    m = cls(3, 6, num_layers=2, bidirectional=True, zoneout=zoneout, dropconnect=0.3, dtype=torch.float64)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    torch.manual_seed(42)
    got = m(x, lengths=lengths)[0]
    torch.manual_seed(42)
    again = m(x, lengths=lengths)[0]
    assert torch.equal(got, again)
    lstm = m.cell == "lstm"
    h0 = torch.zeros(4, 3, 6, dtype=torch.float64)
    torch.manual_seed(42)
    want = spec_module(m, x, h0, h0 if lstm else None, lengths, zoneout_draws=True)[0]
    assert max_error(got, want) <= 1e-12
    torch.manual_seed(43)
    assert not torch.equal(m(x, lengths=lengths)[0], got)


def test_zoneout_keeps_the_drawn_fraction_of_units():
    """With zoneout p, a fraction ~p of (t, b, j) keeps h_{t-1} exactly (binomial: within 5 sigma)."""
    torch.manual_seed(0)
    p = 0.6
    m = fusedrnn.GRU(4, 64, zoneout=p).train()
    y, _ = m(torch.randn(20, 8, 4))
    kept = (y[1:] == y[:-1]).double().mean().item()
    n = y[1:].numel()
    assert abs(kept - p) <= 5 * (p * (1 - p) / n) ** 0.5, kept


def test_dropconnect_mask_is_fixed_for_the_sequence():
    """The dropped recurrent weights are the same at every step: a unit whose every recurrent weight is
    dropped gets no contribution from h at any step (checked by comparing with the spec on the masked W)."""
    torch.manual_seed(0)
    m = fusedrnn.RNN(2, 3, dropconnect=0.5, dtype=torch.float64).train()
    x = torch.randn(6, 2, 2, dtype=torch.float64)
    torch.manual_seed(7)
    got = m(x)[0]
    torch.manual_seed(7)
    w_hh = F.dropout(m.weight_hh_l0, 0.5, training=True)
    want = reference.rnn_tanh_layer(x, torch.zeros(2, 3, dtype=torch.float64), None, m.weight_ih_l0, w_hh,
                                    m.bias_ih_l0, m.bias_hh_l0)[0]
    assert max_error(got, want) <= 1e-13


def test_compile_fullgraph_layernorm_lstm():
    torch.manual_seed(0)
    m = fusedrnn.LayerNormLSTM(3, 8, num_layers=2)
    x = torch.randn(5, 2, 3, requires_grad=True)
    eager_y, _ = m(x)
    eager_g = torch.autograd.grad(eager_y.sum(), [x] + list(m.parameters()))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y, _ = compiled(x)
    g = torch.autograd.grad(y.sum(), [x] + list(m.parameters()))
    assert max_error(y, eager_y) <= 1e-6
    for a, b in zip(g, eager_g):
        assert max_error(a, b) <= 1e-5


def test_explain_names_the_ext_op_and_refuses_aten():
    m = fusedrnn.LayerNormGRU(3, 4)
    report = str(fusedrnn.explain(m, torch.randn(2, 1, 3)))
    assert "gru-ext" in report and "layernorm" in report
    with fusedrnn.use_backend("aten"), pytest.raises(fusedrnn.BackendUnsupportedError, match="no LayerNorm"):
        m(torch.randn(2, 1, 3))


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"zoneout": 1.0}, r"zoneout: expected a probability in \[0, 1\)"),
    ({"zoneout": -0.1}, "zoneout"),
    ({"zoneout": "0.1"}, "zoneout"),
    ({"dropconnect": 1.5}, "dropconnect"),
    ({"zoneout": (0.1, 0.2, 0.3)}, "pair"),
    ({"zoneout": 0.1, "proj_size": 2}, "proj_size"),
])
def test_bad_module_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fusedrnn.LSTM(3, 4, **kwargs)


def test_bad_module_arguments_per_cell():
    with pytest.raises(ValueError, match="one probability"):
        fusedrnn.GRU(3, 4, zoneout=(0.1, 0.2))
    with pytest.raises(TypeError, match="zoneout"):
        fusedrnn.RNN(3, 4, zoneout=0.1)
    with pytest.raises(TypeError, match="proj_size"):
        fusedrnn.LayerNormLSTM(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="to_torch"):
        fusedrnn.to_torch(fusedrnn.LSTM(3, 4, zoneout=0.1))


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(ln_ih=a["ln_ih"][:-1]), ValueError, r"ln_ih: expected shape \[20\]"),
    (lambda a: a.update(ln_hh=None), ValueError, "ln_ih, ln_hh"),
    (lambda a: a.update(ln_c_weight=None, ln_c_bias=None), ValueError, "ln_c_weight"),
    (lambda a: a.update(ln_c_bias=a["ln_c_bias"].float()), TypeError, "ln_c_bias: expected dtype"),
    (lambda a: a.update(zoneout_h=a["zoneout_h"][:, :1]), ValueError, r"zoneout_h: expected shape \[3, 2, 5\]"),
    (lambda a: a.update(zoneout_c=[1.0]), TypeError, "zoneout_c: expected a Tensor"),
])
def test_bad_functional_arguments(change, error, match):
    args = make_ext_args("lstm", 3, 2, 4, 5)
    change(args)
    with pytest.raises(error, match=match):
        functional.rnn_layer_ext("lstm", **args)


def test_bad_functional_cell():
    args = make_ext_args("gru", 3, 2, 4, 5)
    with pytest.raises(ValueError, match="cell: expected one of"):
        functional.rnn_layer_ext("rnn_tanh", **args)
    args = make_ext_args("gru", 3, 2, 4, 5)
    args["zoneout_c"] = args["zoneout_h"]
    with pytest.raises(ValueError, match="no cell state"):
        functional.rnn_layer_ext("gru", **args)


def test_onnx_export_refuses_layernorm_and_training_zoneout():
    pytest.importorskip("onnxscript")
    import io

    import fusedrnn.onnx as fusedrnn_onnx
    x = torch.randn(4, 1, 3)
    with pytest.raises(fusedrnn_onnx.ONNXExportError, match="LayerNorm LSTM / GRU"):
        fusedrnn_onnx.export(fusedrnn.LayerNormGRU(3, 4).eval(), (x,), io.BytesIO())
    with pytest.raises(fusedrnn_onnx.ONNXExportError, match="model.eval"):
        fusedrnn_onnx.export(fusedrnn.LSTM(3, 4, zoneout=0.1), (x,), io.BytesIO())
