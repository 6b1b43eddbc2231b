"""Every malformed input raises a clear exception: the message names the argument and says what was expected
and what was given. Where torch.nn raises for the same mistake, fusedrnn raises the same exception type (so
`except` clauses written for torch.nn keep working); the tests run torch.nn on the same call to check it."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from fusedrnn import functional
from helpers import make_layer_args


def torch_exception_type(fn):
    """The type of the exception torch.nn raises for fn(torch.nn), or None when it raises none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn(torch.nn)
        except Exception as e:  # noqa: BLE001
            return type(e)
    return None


def raises_like_torch(fn, match, expected=None):
    """fn(namespace) must raise in fusedrnn with a message matching `match`, of the type torch.nn raises for
    the same call; `expected` is the type when torch.nn raises nothing (or asserts it when it does)."""
    torch_type = torch_exception_type(fn)
    want = torch_type or expected
    assert want is not None, "torch.nn raises nothing here: give the expected type"
    if expected is not None and torch_type is not None:
        assert torch_type is expected, f"torch.nn raises {torch_type.__name__}, test expects {expected.__name__}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(want, match=match):
            fn(fusedrnn)


# ---------------------------------------------------------------------------------------------------------
# Constructor arguments: the same type and message as torch.nn (fusedrnn's message adds the value)
# ---------------------------------------------------------------------------------------------------------
BAD_CONSTRUCTORS = [
    ("hidden_size=0", lambda nn: nn.LSTM(3, 0), ValueError),
    ("hidden_size=-1", lambda nn: nn.GRU(3, -1), ValueError),
    ("hidden_size=2.5", lambda nn: nn.RNN(3, 2.5), TypeError),
    ("input_size=0", lambda nn: nn.GRU(0, 4), ValueError),
    ("num_layers=0", lambda nn: nn.LSTM(3, 4, num_layers=0), ValueError),
    ("num_layers=0-rnn", lambda nn: nn.RNN(3, 4, num_layers=0), ValueError),
    ("dropout=-0.1", lambda nn: nn.LSTM(3, 4, num_layers=2, dropout=-0.1), ValueError),
    ("dropout=1.5", lambda nn: nn.GRU(3, 4, num_layers=2, dropout=1.5), ValueError),
    ("dropout=True", lambda nn: nn.RNN(3, 4, num_layers=2, dropout=True), ValueError),
    ("proj_size=hidden_size", lambda nn: nn.LSTM(3, 4, proj_size=4), ValueError),
    ("proj_size>hidden_size", lambda nn: nn.LSTM(3, 4, proj_size=9), ValueError),
    ("proj_size=-1", lambda nn: nn.LSTM(3, 4, proj_size=-1), ValueError),
    ("nonlinearity=sigmoid", lambda nn: nn.RNN(3, 4, nonlinearity="sigmoid"), ValueError),
]


@pytest.mark.parametrize("fn,expected", [c[1:] for c in BAD_CONSTRUCTORS], ids=[c[0] for c in BAD_CONSTRUCTORS])
def test_bad_constructor_args_raise_like_torch(fn, expected):
    try:
        fn(torch.nn)
    except Exception as e:  # noqa: BLE001
        torch_error = e
    else:
        pytest.fail("torch.nn accepts this")
    assert type(torch_error) is expected
    # torch's message is a prefix of fusedrnn's (which adds the offending value where torch's lacks it)
    with pytest.raises(expected, match="^" + re.escape(str(torch_error))):
        fn(fusedrnn)


@pytest.mark.parametrize("fn,match", [
    (lambda: fusedrnn.RNNCell(3, 4, nonlinearity="sigmoid"), r"Unknown nonlinearity: sigmoid"),
], ids=["RNNCell-sigmoid"])
def test_bad_cell_constructor_args(fn, match):
    """torch.nn accepts these at construction (and fails later or never); fusedrnn refuses them up front."""
    with pytest.raises((ValueError, TypeError), match=match):
        fn()


BAD_CELL_SIZES = [  # torch.nn.RNNCellBase checks no size: torch.empty fails, the same way in fusedrnn
    ("GRUCell-hidden-2", lambda nn: nn.GRUCell(3, -2)),
    ("RNNCell-input-float", lambda nn: nn.RNNCell(1.0, 4)),
    ("LSTMCell-hidden-float", lambda nn: nn.LSTMCell(3, 4.0)),
]


@pytest.mark.parametrize("fn", [c[1] for c in BAD_CELL_SIZES], ids=[c[0] for c in BAD_CELL_SIZES])
def test_bad_cell_sizes_raise_like_torch(fn):
    try:
        fn(torch.nn)
    except Exception as e:  # noqa: BLE001
        torch_error = e
    else:
        pytest.fail("torch.nn accepts this")
    with pytest.raises(type(torch_error), match="^" + re.escape(str(torch_error)) + "$"):
        fn(fusedrnn)


# ---------------------------------------------------------------------------------------------------------
# Layer forward
# ---------------------------------------------------------------------------------------------------------
def lstm(nn):
    torch.manual_seed(0)
    return nn.LSTM(3, 4)


def gru(nn):
    return nn.GRU(3, 4, num_layers=2)


X = torch.randn(5, 2, 3)
X2 = torch.randn(5, 3)
H = torch.zeros(1, 2, 4)
H_UNB = torch.zeros(1, 4)

BAD_FORWARDS = [
    ("input-4D", lambda nn: lstm(nn)(torch.randn(1, 5, 2, 3)),
     r"LSTM: Expected input to be 2D or 3D, got 4D instead"),
    ("input-1D", lambda nn: gru(nn)(torch.randn(3)), r"GRU: Expected input to be 2D or 3D, got 1D instead"),
    ("input-T0", lambda nn: lstm(nn)(torch.randn(0, 2, 3)), r"Expected sequence length to be larger than 0"),
    ("features-5x2x4", lambda nn: lstm(nn)(torch.randn(5, 2, 4)),
     r"input.size\(-1\) must be equal to input_size. Expected 3, got 4"),
    ("features-unbatched-5x2", lambda nn: gru(nn)(torch.randn(5, 2)),
     r"input.size\(-1\) must be equal to input_size. Expected 3, got 2"),
    # hidden shapes, h0 and c0 separately, batched and unbatched
    ("h0-1x3x4", lambda nn: lstm(nn)(X, (torch.zeros(1, 3, 4), H)),
     r"Expected hidden\[0\] size \(1, 2, 4\), got \[1, 3, 4\]"),
    ("c0-1x2x5", lambda nn: lstm(nn)(X, (H, torch.zeros(1, 2, 5))),
     r"Expected hidden\[1\] size \(1, 2, 4\), got \[1, 2, 5\]"),
    ("h0-unbatched-1x5", lambda nn: lstm(nn)(X2, (torch.zeros(1, 5), H_UNB)),
     r"Expected hidden\[0\] size \(1, 1, 4\), got \[1, 1, 5\]"),
    ("c0-unbatched-2x4", lambda nn: lstm(nn)(X2, (H_UNB, torch.zeros(2, 4))),
     r"Expected hidden\[1\] size \(1, 1, 4\), got \[2, 1, 4\]"),
    ("gru-h0-1x2x4-for-2-layers", lambda nn: gru(nn)(X, H), r"Expected hidden size \(2, 2, 4\), got \[1, 2, 4\]"),
    ("gru-h0-unbatched-3x4", lambda nn: gru(nn)(X2, torch.zeros(3, 4)),
     r"Expected hidden size \(2, 1, 4\), got \[3, 1, 4\]"),
    # hx rank vs input rank
    ("h0-2D-for-3D-input", lambda nn: lstm(nn)(X, (torch.zeros(2, 4), H)),
     r"For batched 3-D input, hx and cx should also be 3-D but got \(2-D, 3-D\) tensors"),
    ("c0-2D-for-3D-input", lambda nn: lstm(nn)(X, (H, torch.zeros(2, 4))),
     r"For batched 3-D input, hx and cx should also be 3-D but got \(3-D, 2-D\) tensors"),
    ("h0-3D-for-2D-input", lambda nn: lstm(nn)(X2, (torch.zeros(1, 1, 4), H_UNB)),
     r"For unbatched 2-D input, hx and cx should also be 2-D but got \(3-D, 2-D\) tensors"),
    ("gru-h0-3D-for-2D-input", lambda nn: gru(nn)(X2, torch.zeros(2, 1, 4)),
     r"For unbatched 2-D input, hx should also be 2-D but got 3-D tensor"),
    # dtypes
    ("input-fp64-params-fp32", lambda nn: lstm(nn)(X.double()),
     r"RNN input dtype \(torch.float64\) does not match weight dtype \(torch.float32\). Convert input: "
     r"input.to\(torch.float32\), or convert model: model.to\(torch.float64\)"),
    ("input-int64", lambda nn: gru(nn)(X.long()),
     r"RNN input dtype \(torch.int64\) does not match weight dtype \(torch.float32\)"),
    ("h0-fp64-input-fp32", lambda nn: lstm(nn)(X, (H.double(), H)),
     r"hidden\[0\] must have the type torch.float32 \(the dtype of input\), got type torch.float64"),
    ("gru-h0-fp64-input-fp32", lambda nn: gru(nn)(X, torch.zeros(2, 2, 4, dtype=torch.float64)),
     r"hidden must have the type torch.float32 \(the dtype of input\), got type torch.float64"),
    # devices (meta is a second device on a CPU-only machine)
    ("input-meta-params-cpu", lambda nn: lstm(nn)(X.to("meta")),
     r"input must be on device cpu \(the device of the module's parameters\), got meta"),
    ("h0-meta", lambda nn: lstm(nn)(X, (H.to("meta"), H)), r"hidden\[0\] must be on device cpu .*got meta"),
    ("gru-h0-meta", lambda nn: gru(nn)(X, torch.zeros(2, 2, 4, device="meta")),
     r"hidden must be on device cpu \(the device of input\), got meta"),
]

NOT_IN_TORCH = [  # torch.nn raises nothing or an unrelated error (IndexError, AttributeError) for these
    ("c0-fp64-input-fp32", lambda nn: lstm(nn)(X, (H, H.double())),
     r"hidden\[1\] must have the type torch.float32 \(the dtype of input\), got type torch.float64", RuntimeError),
    ("c0-meta", lambda nn: lstm(nn)(X, (H, H.to("meta"))),
     r"hidden\[1\] must be on device cpu \(the device of input\), got meta", RuntimeError),
    ("lstm-hx-tensor", lambda nn: lstm(nn)(X, H),
     r"hx: an LSTM expects a tuple \(h_0, c_0\) or None, got Tensor", TypeError),
    ("input-list", lambda nn: lstm(nn)([[1.0, 2.0, 3.0]]), r"input: expected a Tensor or PackedSequence, got list",
     TypeError),
]


@pytest.mark.parametrize("fn,match", [c[1:] for c in BAD_FORWARDS], ids=[c[0] for c in BAD_FORWARDS])
def test_bad_layer_input_raises_like_torch(fn, match):
    assert torch_exception_type(fn) is not None, "torch.nn accepts this"
    raises_like_torch(fn, match)


@pytest.mark.parametrize("fn,match,expected", [c[1:] for c in NOT_IN_TORCH], ids=[c[0] for c in NOT_IN_TORCH])
def test_bad_layer_input_raises(fn, match, expected):
    with pytest.raises(expected, match=match):
        fn(fusedrnn)


# ---------------------------------------------------------------------------------------------------------
# lengths= (a fusedrnn addition)
# ---------------------------------------------------------------------------------------------------------
BAD_LENGTHS = [
    ("negative", torch.tensor([5, -1]), ValueError, r"lengths: expected every length in \[0, 5\].*got min -1"),
    ("above-T", [6, 2], ValueError, r"lengths: expected every length in \[0, 5\].*max 6"),
    ("shape-2x1", torch.tensor([[5], [2]]), ValueError, r"lengths: expected a 1-D tensor \[B\], got shape \[2, 1\]"),
    ("shape-3", torch.tensor([5, 2, 1]), ValueError, r"lengths: expected shape \[2\].*got \[3\]"),
    ("list-3", [5, 2, 1], ValueError, r"lengths: expected shape \[2\].*got \[3\]"),
    ("float-tensor", torch.tensor([5.0, 2.0]), TypeError, r"lengths: expected an integer dtype, got torch.float32"),
    ("float-list", [4.5, 2.0], TypeError, r"lengths: expected an integer dtype, got torch.float"),
    ("bool-tensor", torch.tensor([True, False]), TypeError, r"lengths: expected an integer dtype, got torch.bool"),
    ("meta-device", torch.tensor([5, 2], device="meta"), ValueError,
     r"lengths: expected a tensor on the CPU or on the input's device cpu, got meta"),
    ("not-a-sequence", 5, TypeError, r"lengths: expected a 1-D integer tensor or a list of ints, got 5"),
]


@pytest.mark.parametrize("lengths,exc,match", [c[1:] for c in BAD_LENGTHS], ids=[c[0] for c in BAD_LENGTHS])
@pytest.mark.parametrize("batch_first", [False, True], ids=["T-major", "batch_first"])
def test_bad_lengths(lengths, exc, match, batch_first):
    m = fusedrnn.GRU(3, 4, batch_first=batch_first)
    x = torch.randn(2, 5, 3) if batch_first else torch.randn(5, 2, 3)
    with pytest.raises(exc, match=match):
        m(x, lengths=lengths)


def test_lengths_with_packed_sequence():
    m = fusedrnn.LSTM(3, 4)
    packed = pack_padded_sequence(torch.randn(5, 2, 3), [5, 2])
    with pytest.raises(ValueError, match=r"lengths: must be None for a PackedSequence input"):
        m(packed, lengths=[5, 2])


def test_lengths_with_unbatched_input():
    with pytest.raises(ValueError, match=r"lengths: not supported for unbatched \(2-D\) input"):
        fusedrnn.RNN(3, 4)(torch.randn(5, 3), lengths=[5])


# ---------------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------------
def lstm_cell(nn):
    return nn.LSTMCell(3, 4)


def gru_cell(nn):
    return nn.GRUCell(3, 4)


XC = torch.randn(2, 3)
HC = torch.zeros(2, 4)

BAD_CELL_INPUTS = [
    ("input-3D", lambda nn: lstm_cell(nn)(torch.randn(1, 2, 3)),
     r"LSTMCell: Expected input to be 1D or 2D, got 3D"),
    ("input-0D", lambda nn: gru_cell(nn)(torch.tensor(1.0)), r"GRUCell: Expected input to be 1D or 2D, got 0D"),
    ("features-2x4", lambda nn: lstm_cell(nn)(torch.randn(2, 4)),
     r"input has inconsistent input_size: got 4 expected 3"),
    ("features-unbatched-5", lambda nn: gru_cell(nn)(torch.randn(5)),
     r"input has inconsistent input_size: got 5 expected 3"),
    ("h0-3x4", lambda nn: lstm_cell(nn)(XC, (torch.zeros(3, 4), HC)),
     r"Input batch size 2 doesn't match hidden0 batch size 3"),
    ("c0-2x5", lambda nn: lstm_cell(nn)(XC, (HC, torch.zeros(2, 5))),
     r"hidden1 has inconsistent hidden_size: got 5, expected 4"),
    ("h0-unbatched-5", lambda nn: lstm_cell(nn)(torch.randn(3), (torch.zeros(5), torch.zeros(4))),
     r"hidden0 has inconsistent hidden_size: got 5, expected 4"),
    ("c0-unbatched-5", lambda nn: lstm_cell(nn)(torch.randn(3), (torch.zeros(4), torch.zeros(5))),
     r"hidden1 has inconsistent hidden_size: got 5, expected 4"),
    ("gru-hx-3x4", lambda nn: gru_cell(nn)(XC, torch.zeros(3, 4)),
     r"Input batch size 2 doesn't match hidden0 batch size 3"),
    ("hx-1D-for-2D-input", lambda nn: lstm_cell(nn)(XC, (torch.zeros(4), torch.zeros(4))),
     r"Input batch size 2 doesn't match hidden0 batch size 4"),
    ("gru-hx-2D-for-1D-input", lambda nn: gru_cell(nn)(torch.randn(3), torch.zeros(2, 4)),
     r"hidden0 has inconsistent hidden_size: got 2, expected 4"),
    ("input-fp64-params-fp32", lambda nn: lstm_cell(nn)(XC.double()),
     r"input must have the type torch.float32 \(the dtype of the module's parameters\), got type torch.float64"),
    ("gru-hx-fp64", lambda nn: gru_cell(nn)(XC, HC.double()),
     r"hidden0 must have the type torch.float32 \(the dtype of input\), got type torch.float64"),
    ("input-meta", lambda nn: gru_cell(nn)(XC.to("meta")), r"input must be on device cpu .*got meta"),
    ("h0-meta", lambda nn: lstm_cell(nn)(XC, (HC.to("meta"), HC)), r"hidden0 must be on device cpu .*got meta"),
]


@pytest.mark.parametrize("fn,match", [c[1:] for c in BAD_CELL_INPUTS], ids=[c[0] for c in BAD_CELL_INPUTS])
def test_bad_cell_input_raises_like_torch(fn, match):
    assert torch_exception_type(fn) is not None, "torch.nn accepts this"
    raises_like_torch(fn, match)


def test_bad_cell_hx_not_in_torch():
    with pytest.raises(RuntimeError, match=r"hidden1 must have the type torch.float32.*got type torch.float64"):
        fusedrnn.LSTMCell(3, 4)(XC, (HC, HC.double()))  # torch.nn silently promotes
    with pytest.raises(TypeError, match=r"hx: an LSTMCell expects a tuple \(h_0, c_0\) or None, got Tensor"):
        fusedrnn.LSTMCell(3, 4)(XC, HC)
    with pytest.raises(TypeError, match=r"input: expected a Tensor, got list"):
        fusedrnn.GRUCell(3, 4)([1.0, 2.0, 3.0])


# ---------------------------------------------------------------------------------------------------------
# functional.rnn_layer
# ---------------------------------------------------------------------------------------------------------
def layer_args(cell="lstm", proj=0, **kw):
    args = make_layer_args(cell, T=4, B=2, I=3, H=5, proj=proj, requires_grad=False, **kw)
    args.pop("reverse")
    return args


def _replace(args, **kw):
    return {**args, **kw}


def f64(*shape, device="cpu"):
    return torch.randn(*shape, dtype=torch.float64, device=device)


BAD_FUNCTIONAL = [  # (id, cell, replaced arguments, exception, message)
    ("cell-name", "lstmx", {}, ValueError,
     r"cell: expected one of \['lstm', 'gru', 'rnn_tanh', 'rnn_relu'\], got 'lstmx'"),
    ("x-2D", "lstm", dict(x=f64(4, 3)), ValueError, r"x: expected a 3-D tensor \[T, B, I\], got 2-D tensor"),
    ("x-not-tensor", "gru", dict(x=[1.0]), ValueError, r"x: expected a 3-D tensor \[T, B, I\], got list"),
    ("x-int", "gru", dict(x=torch.ones(4, 2, 3, dtype=torch.int64)), TypeError,
     r"x: expected a floating dtype.*got torch.int64"),
    ("x-T0", "rnn_tanh", dict(x=f64(0, 2, 3)), ValueError, r"x: expected sequence length T > 0"),
    ("x-I4", "lstm", dict(x=f64(4, 2, 4)), ValueError, r"w_ih: expected shape \[20, 4\], got \[20, 3\]"),
    ("w_ih-19x3", "lstm", dict(w_ih=f64(19, 3)), ValueError, r"w_ih: expected shape \[20, 3\], got \[19, 3\]"),
    ("w_hh-not-G*H", "gru", dict(w_hh=f64(16, 5)), ValueError,
     r"w_hh: expected \[3\*H, H_out\] for gru, got \[16, 5\]"),
    ("w_hh-1D", "rnn_relu", dict(w_hh=f64(5)), ValueError,
     r"w_hh: expected \[1\*H, H_out\] for rnn_relu, got \[5\]"),
    ("w_hh-20x4", "lstm", dict(w_hh=f64(20, 4)), ValueError, r"w_hh: expected shape \[20, 5\], got \[20, 4\]"),
    ("h0-3x5", "lstm", dict(h0=f64(3, 5)), ValueError, r"h0: expected shape \[2, 5\], got \[3, 5\]"),
    ("h0-1x2x5", "gru", dict(h0=f64(1, 2, 5)), ValueError, r"h0: expected shape \[2, 5\], got \[1, 2, 5\]"),
    ("c0-2x4", "lstm", dict(c0=f64(2, 4)), ValueError, r"c0: expected shape \[2, 5\], got \[2, 4\]"),
    ("c0-None", "lstm", dict(c0=None), ValueError, r"c0: an LSTM needs an initial cell state \[B, H\], got None"),
    ("gru-c0", "gru", dict(c0=f64(2, 5)), ValueError, r"gru has no cell state and no projection"),
    ("b_ih-19", "rnn_tanh", dict(b_ih=f64(19)), ValueError, r"b_ih: expected shape \[5\], got \[19\]"),
    ("b_hh-only", "lstm", dict(b_ih=None), ValueError, r"b_ih, b_hh: give both biases or neither"),
    ("b_hh-list", "lstm", dict(b_hh=[0.0] * 20), TypeError, r"b_hh: expected a Tensor, got list"),
    ("h0-fp32", "lstm", dict(h0=torch.randn(2, 5)), TypeError,
     r"h0: expected dtype torch.float64 \(the dtype of x\), got torch.float32"),
    ("w_hh-fp32", "gru", dict(w_hh=torch.randn(15, 5)), TypeError,
     r"w_hh: expected dtype torch.float64 \(the dtype of x\), got torch.float32"),
    ("w_ih-meta", "lstm", dict(w_ih=f64(20, 3, device="meta")), ValueError,
     r"w_ih: expected device cpu \(the device of x\), got meta"),
    ("lengths-above-T", "lstm", dict(lengths=torch.tensor([5, 1])), ValueError,
     r"lengths: expected every length in \[0, 4\]"),
    ("lengths-negative", "gru", dict(lengths=torch.tensor([-1, 1])), ValueError,
     r"lengths: expected every length in \[0, 4\]"),
    ("lengths-shape-3", "lstm", dict(lengths=torch.tensor([1, 1, 1])), ValueError, r"lengths: expected shape \[2\]"),
    ("lengths-float", "lstm", dict(lengths=torch.tensor([1.0, 1.0])), TypeError, r"lengths: expected an integer dtype"),
    ("lengths-list", "lstm", dict(lengths=[1, 1]), TypeError, r"lengths: expected an integer Tensor \[B\], got list"),
    ("lengths-meta", "lstm", dict(lengths=torch.tensor([1, 1], device="meta")), ValueError,
     r"lengths: expected device cpu \(the device of the input\), got meta"),
]



@pytest.mark.parametrize("cell,changes,exc,match", [c[1:] for c in BAD_FUNCTIONAL],
                         ids=[c[0] for c in BAD_FUNCTIONAL])
def test_functional_rnn_layer_bad_args(cell, changes, exc, match):
    args = _replace(layer_args("lstm" if cell == "lstmx" else cell), **changes)
    with pytest.raises(exc, match=match):
        functional.rnn_layer(cell, **args)


def test_functional_rnn_layer_bad_projection():
    args = layer_args("lstm", proj=3)
    with pytest.raises(ValueError, match=r"w_hr: expected shape \[3, 5\], got \[3, 4\]"):
        functional.rnn_layer("lstm", **_replace(args, w_hr=torch.randn(3, 4, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"w_hh: expected shape \[20, 3\], got \[20, 5\]"):
        functional.rnn_layer("lstm", **_replace(args, w_hh=torch.randn(20, 5, dtype=torch.float64)))
    gru_args = layer_args("gru")
    with pytest.raises(ValueError, match=r"gru has no cell state and no projection: c0 and w_hr must be None"):
        functional.rnn_layer("gru", **_replace(gru_args, w_hr=torch.randn(5, 5, dtype=torch.float64)))


def test_valid_call_passes():
    """The baseline the cases above corrupt is itself valid (so each failure is due to its one change)."""
    for cell in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        y, h, c = functional.rnn_layer(cell, **layer_args(cell, lengths=[4, 1]))
        assert y.shape == (4, 2, 5) and h.shape == (2, 5) and (c is None) == (cell != "lstm")
    assert functional.rnn_layer("lstm", **layer_args("lstm", proj=3))[0].shape == (4, 2, 3)
    m = lstm(fusedrnn)
    m(X, (H, H))
    m(X2, (H_UNB, H_UNB))
    gru(fusedrnn)(X, torch.zeros(2, 2, 4))
    fusedrnn.GRU(3, 4)(X, lengths=[5, 2])
    lstm_cell(fusedrnn)(XC, (HC, HC))
    lstm_cell(fusedrnn)(torch.randn(3), (torch.zeros(4), torch.zeros(4)))
