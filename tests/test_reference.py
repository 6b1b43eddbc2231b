"""The spec against torch.nn's own single-layer modules, and the reference backend's BPTT against autograd
through the spec."""
import pytest
import torch

from fusedrnn import functional, reference, use_backend
from helpers import CELLS, assert_close_to_reference, make_layer_args, run_and_grad

TORCH_MODULE = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN, "rnn_relu": torch.nn.RNN}


def _torch_layer(cell, args):
    H = args["w_hh"].shape[0] // reference.GATES[cell]
    I = args["x"].shape[-1]
    kw = {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}
    if args["w_hr"] is not None:
        kw["proj_size"] = args["w_hr"].shape[0]
    m = TORCH_MODULE[cell](I, H, bias=args["b_ih"] is not None, dtype=torch.float64, **kw)
    with torch.no_grad():
        m.weight_ih_l0.copy_(args["w_ih"])
        m.weight_hh_l0.copy_(args["w_hh"])
        if args["b_ih"] is not None:
            m.bias_ih_l0.copy_(args["b_ih"])
            m.bias_hh_l0.copy_(args["b_hh"])
        if args["w_hr"] is not None:
            m.weight_hr_l0.copy_(args["w_hr"])
    return m


CELL_PROJ = [(c, 0) for c in CELLS] + [("lstm", 3)]  # projection is LSTM-only


@pytest.mark.parametrize("cell,proj", CELL_PROJ)
def test_spec_matches_torch_nn(cell, proj):
    args = make_layer_args(cell, T=6, B=3, I=5, H=7, proj=proj, requires_grad=False)
    m = _torch_layer(cell, args)
    hx = (args["h0"][None], args["c0"][None]) if cell == "lstm" else args["h0"][None]
    y_t, state = m(args["x"], hx)
    y, h, c = reference.rnn_layer(cell, **args)
    assert torch.allclose(y, y_t, atol=1e-12)
    assert torch.allclose(h, (state[0] if cell == "lstm" else state)[0], atol=1e-12)
    if cell == "lstm":
        assert torch.allclose(c, state[1][0], atol=1e-12)


@pytest.mark.parametrize("cell", CELLS)
def test_spec_lengths_and_reverse_match_packed_torch(cell):
    lengths = [6, 2, 4, 1]
    args = make_layer_args(cell, T=6, B=4, I=3, H=5, requires_grad=False, lengths=lengths)
    m = _torch_layer(cell, args)
    kw = {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}
    bi = TORCH_MODULE[cell](3, 5, bidirectional=True, dtype=torch.float64, **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            getattr(bi, name).copy_(p)
            getattr(bi, name + "_reverse").copy_(p)
    packed = torch.nn.utils.rnn.pack_padded_sequence(args["x"], lengths, enforce_sorted=False)
    h0 = args["h0"][None].expand(2, -1, -1).contiguous()
    hx = (h0, args["c0"][None].expand(2, -1, -1).contiguous()) if cell == "lstm" else h0
    out, state = bi(packed, hx)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=6)
    h_t = state[0] if cell == "lstm" else state
    for d, rev in enumerate([False, True]):
        y, h, _ = reference.rnn_layer(cell, **{**args, "reverse": rev})
        assert torch.allclose(y, out[..., d * 5:(d + 1) * 5], atol=1e-12)
        assert torch.allclose(h, h_t[d], atol=1e-12)


@pytest.mark.parametrize("cell,proj", CELL_PROJ)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", [None, [5, 1, 3]], ids=["full", "lengths"])
def test_reference_backend_bptt_matches_autograd(cell, proj, reverse, lengths):
    args = make_layer_args(cell, T=5, B=3, I=4, H=6, proj=proj, lengths=lengths, reverse=reverse)
    ref_out, ref_grads = run_and_grad(lambda **a: reference.rnn_layer(cell, **a), args)
    with use_backend("reference"):
        out, grads = run_and_grad(lambda **a: functional.rnn_layer(cell, **a), args)
    for i, (o, r) in enumerate(zip(out, ref_out)):
        assert_close_to_reference(f"output {i}", o, r)
    for name, g in grads.items():
        assert_close_to_reference(f"grad {name}", g, ref_grads[name])
