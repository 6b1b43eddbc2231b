"""fusedrnn.convert / fusedrnn.to_torch / fusedrnn.quantize_dynamic: whole models swapped both ways."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fusedrnn
from helpers import FULL_PRECISION_TOL

TORCH_CLASSES = (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
FUSED_CLASSES = (fusedrnn.LSTM, fusedrnn.GRU, fusedrnn.RNN, fusedrnn.LSTMCell, fusedrnn.GRUCell, fusedrnn.RNNCell)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(5, 6, num_layers=2, batch_first=True, dropout=0.3)
        self.norm = nn.LayerNorm(6)


class Net(nn.Module):
    """Every kind and option: nested, shared (3 names), 2-layer bidirectional GRU, relu RNN without bias,
    proj_size, the three cells, a float64 GRU, batch_first and not."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        shared = nn.LSTM(6, 6, batch_first=True)
        self.shared = shared
        self.again = nn.ModuleList([shared, shared])
        self.gru = nn.GRU(6, 4, num_layers=2, bidirectional=True, batch_first=True)
        self.rnn = nn.RNN(8, 4, nonlinearity="relu", bias=False, batch_first=True)
        self.proj = nn.LSTM(4, 6, proj_size=3, batch_first=True)
        self.lstm_cell = nn.LSTMCell(3, 4)
        self.gru_cell = nn.GRUCell(4, 4, bias=False)
        self.rnn_cell = nn.RNNCell(4, 4, nonlinearity="relu")
        self.f64 = nn.GRU(4, 3).double()  # sequence-first

    def forward(self, x):
        y = self.block.norm(self.block.lstm(x)[0])
        y = self.again[1](self.again[0](self.shared(y)[0])[0])[0]
        y = self.proj(self.rnn(self.gru(y)[0])[0])[0]
        h = c = g = r = None
        steps = []
        for t in range(y.shape[1]):
            h, c = self.lstm_cell(y[:, t], None if h is None else (h, c))
            g = self.gru_cell(h, g)
            r = self.rnn_cell(g, r)
            steps.append(r)
        return self.f64(torch.stack(steps).double())[0]


def kinds(model):
    return {name: type(m) for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, TORCH_CLASSES + FUSED_CLASSES)}


def assert_close(got, want):
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item()
    assert err <= FULL_PRECISION_TOL[torch.float32] * scale, err


@pytest.fixture
def x():
    return torch.randn(3, 7, 5)


def test_convert_and_back(x):
    model = Net().eval()
    want = model(x)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    model.lstm_cell.weight_hh.requires_grad_(False)
    names = set(kinds(model))

    assert fusedrnn.convert(model) is model
    assert set(kinds(model)) == names
    for name, cls in kinds(model).items():
        assert cls in FUSED_CLASSES, name
    assert model.shared is model.again[0] is model.again[1]
    assert isinstance(model.block.norm, nn.LayerNorm)
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    assert not model.lstm_cell.weight_hh.requires_grad and model.gru.weight_ih_l0.requires_grad
    assert model.f64.weight_ih_l0.dtype == torch.float64
    assert (model.rnn.nonlinearity, model.rnn.bias, model.proj.proj_size, model.block.lstm.dropout) == \
        ("relu", False, 3, 0.3)
    assert (model.gru_cell.bias, model.rnn_cell.nonlinearity, model.gru.bidirectional) == (False, "relu", True)
    assert not model.training and not model.block.lstm.training
    got = model(x)
    assert got.dtype == torch.float64
    assert_close(got, want)

    assert fusedrnn.to_torch(model) is model
    for name, cls in kinds(model).items():
        assert cls in TORCH_CLASSES, name
    assert model.shared is model.again[0] is model.again[1]
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    assert torch.equal(model(x), want)  # the same torch.nn code on the same weights


def test_training_flag_kept():
    model = Net().train()
    model.gru.eval()
    fusedrnn.convert(model)
    assert model.training and model.block.lstm.training and not model.gru.training
    fusedrnn.to_torch(model)
    assert model.training and model.block.lstm.training and not model.gru.training


def test_existing_optimizer_trains_the_converted_model(x):
    torch_model = Net().eval()
    model = copy.deepcopy(torch_model)
    start = copy.deepcopy(model.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (torch_model, model)]
    fusedrnn.convert(model)  # after the optimizer was built
    for m, opt in zip((torch_model, model), opts):
        for _ in range(2):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (name, got), want in zip(model.named_parameters(), torch_model.parameters()):
        assert_close(got, want)
    # the layers near the loss get gradients well above the tolerance: the steps really happened
    for name in ("f64.weight_hh_l0", "rnn_cell.weight_ih", "proj.weight_hr_l0"):
        moved = (model.state_dict()[name] - start[name]).abs().max().item()
        assert moved > 1e-3, (name, moved)


def test_root_module_and_hooks():
    lstm = nn.LSTM(4, 5, batch_first=True)
    calls = []
    pre = lstm.register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m))))
    lstm.register_forward_hook(lambda m, args, out: calls.append(("post", type(m))))
    lstm.register_full_backward_hook(lambda m, gin, gout: calls.append(("backward", type(m))))
    new = fusedrnn.convert(lstm)
    assert type(new) is fusedrnn.LSTM and new.weight_ih_l0 is lstm.weight_ih_l0
    new(torch.randn(2, 3, 4, requires_grad=True))[0].sum().backward()
    assert calls == [("pre", fusedrnn.LSTM), ("post", fusedrnn.LSTM), ("backward", fusedrnn.LSTM)]
    pre.remove()  # a handle taken before the swap still works
    calls.clear()
    new(torch.randn(2, 3, 4))
    assert calls == [("post", fusedrnn.LSTM)]


def test_subclasses_are_not_swapped_silently():
    class MyGRU(nn.GRU):
        def forward(self, x, hx=None):
            return super().forward(x * 2, hx)

    model = nn.Sequential(MyGRU(3, 4), nn.GRU(4, 4))
    nn.utils.parametrize.register_parametrization(model[1], "weight_hh_l0", nn.Identity())
    with pytest.warns(UserWarning, match=r"0 \(.*MyGRU\).*1 \(.*ParametrizedGRU\)"):
        fusedrnn.convert(model)
    assert type(model[0]) is MyGRU and type(model[1]).__name__ == "ParametrizedGRU"
    with pytest.warns(UserWarning, match="ParametrizedGRU.*not the plain torch.nn ones"):
        fusedrnn.convert(model, convert_subclasses=True)
    assert type(model[0]) is fusedrnn.GRU


def test_include_exclude():
    model = Net()
    fusedrnn.convert(model, include=(nn.GRU, nn.GRUCell), exclude=lambda name, m: name == "f64")
    assert {name for name, cls in kinds(model).items() if cls in FUSED_CLASSES} == {"gru", "gru_cell"}
    fusedrnn.convert(model, exclude=fusedrnn.LSTM)  # a fusedrnn class names its torch.nn counterpart too
    fused = {name for name, cls in kinds(model).items() if cls in FUSED_CLASSES}
    assert fused == {"gru", "gru_cell", "rnn", "f64", "lstm_cell", "rnn_cell"}


def test_merge_mode_cannot_go_to_torch():
    model = nn.Sequential(fusedrnn.LSTM(3, 4), nn.ModuleDict({"enc": fusedrnn.GRU(4, 4, bidirectional=True,
                                                                                     merge_mode="sum")}))
    with pytest.raises(ValueError, match=r"1\.enc \(fusedrnn\.nn\.GRU\) uses merge_mode='sum'"):
        fusedrnn.to_torch(model)
    assert type(model[0]) is fusedrnn.LSTM  # nothing swapped
    # without bidirectional, merge_mode has no effect: nothing is lost
    one_way = fusedrnn.to_torch(fusedrnn.GRU(3, 4, merge_mode="sum"))
    assert type(one_way) is nn.GRU


@pytest.mark.gpu
def test_convert_keeps_the_device():
    model = Net().cuda().eval()
    x = torch.randn(3, 7, 5, device="cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # TF32 would set the bound, not fusedrnn
        want = model(x)
        fusedrnn.convert(model)
        assert all(p.is_cuda for p in model.parameters())
        assert_close(model(x), want)
        fusedrnn.to_torch(model)
        assert_close(model(x), want)


# -- quantization ---------------------------------------------------------------------------------------
class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = fusedrnn.LSTM(8, 32, num_layers=2, batch_first=True)
        self.gru = fusedrnn.GRU(32, 16, batch_first=True)
        self.rnn = fusedrnn.RNN(16, 16, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.rnn(self.gru(self.lstm(x)[0])[0])[0])


@pytest.fixture
def quiet_ao():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated")  # torch.ao.quantization's own notice
        yield


def test_quantize_dynamic(quiet_ao):
    from torch.ao.nn.quantized import dynamic as nnqd
    model = Tagger().eval()
    x = torch.randn(4, 12, 8)
    float_out = model(x)
    q = fusedrnn.quantize_dynamic(model)
    assert type(model.lstm) is fusedrnn.LSTM  # the original is left as it was
    assert type(q.lstm) is nnqd.LSTM and type(q.gru) is nnqd.GRU and type(q.head) is nnqd.Linear
    assert type(q.rnn) is nn.RNN  # torch has no dynamic quantized Elman RNN
    # the bound: torch.nn's own int8 error on the same float model
    torch_q = torch.ao.quantization.quantize_dynamic(fusedrnn.to_torch(copy.deepcopy(model)))
    torch_error = (torch_q(x) - float_out).abs().max().item()
    error = (q(x) - float_out).abs().max().item()
    assert 0 < error <= torch_error + FULL_PRECISION_TOL[torch.float32], (error, torch_error)

    only_lstm = fusedrnn.quantize_dynamic(model, {fusedrnn.LSTM})
    assert type(only_lstm.lstm) is nnqd.LSTM and type(only_lstm.gru) is nn.GRU and type(only_lstm.head) is nn.Linear


def test_torch_quantize_dynamic_leaves_fusedrnn_in_float(quiet_ao):
    """What the docstring of fusedrnn.quantize_dynamic says: torch's function does nothing to fusedrnn modules,
    silently, whether or not qconfig_spec names their classes."""
    model = Tagger().eval()
    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        named = torch.ao.quantization.quantize_dynamic(model, {fusedrnn.LSTM, fusedrnn.GRU})
        default = torch.ao.quantization.quantize_dynamic(model)
    assert not [w for w in caught if "fusedrnn" in str(w.message) or "LSTM" in str(w.message)]
    assert type(named.lstm) is fusedrnn.LSTM and type(named.gru) is fusedrnn.GRU
    assert torch.equal(named(x), model(x))
    assert type(default.lstm) is fusedrnn.LSTM and type(default.head).__module__.startswith("torch.ao")
