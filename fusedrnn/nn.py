"""Drop-in replacements for torch.nn.LSTM / GRU / RNN and the three cells.

Same constructor arguments and validation, same parameter names, shapes, order and initialisation (so a
state_dict loads both ways, and the same seed gives the same weights), same forward signature and results.
Additions: `lengths=` on padded input (a PackedSequence without packing), torch.compile(fullgraph=True)
support, and the fusedrnn backends underneath. The modules hold no math: each layer and direction is one
call of `fusedrnn.functional.rnn_layer`.

These do not subclass torch.nn.RNNBase on purpose: Dynamo special-cases RNNBase and graph-breaks on it.
"""
from __future__ import annotations

import math
import numbers
import warnings
import weakref
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import lane
from .functional import rnn_layer, rnn_layer_ext
from .ops import plain_eager, run_packed_layer
from .reference import GATES

LengthsLike = Union[Tensor, Sequence[int], None]
_PLAIN_TENSORS = (Tensor, nn.Parameter)


def _check_positive_int(name: str, value) -> None:
    """torch.nn.RNNBase's check of input_size / hidden_size (its wording; bool passes, as it is an int)."""
    if not isinstance(value, int):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")


MERGE_MODES = ("concat", "sum", "mul", "ave")


def _merge_directions(fwd: Tensor, bwd: Tensor, mode: str) -> Tensor:
    if mode == "sum":
        return fwd + bwd
    if mode == "mul":
        return fwd * bwd
    return (fwd + bwd) * 0.5  # "ave"


def _check_dtype_device(name: str, t: Tensor, like: Tensor, like_name: str, dtype_error=RuntimeError) -> None:
    # dtype_error: the exception type torch.nn raises for this mismatch (ValueError for a layer's input vs
    # its parameters, RuntimeError elsewhere)
    if t.dtype != like.dtype and not (torch.amp.is_autocast_available(like.device.type)
                                      and torch.is_autocast_enabled(like.device.type)):
        raise dtype_error(f"{name} must have the type {like.dtype} (the dtype of {like_name}), got type {t.dtype}")
    if t.device != like.device:
        raise RuntimeError(f"{name} must be on device {like.device} (the device of {like_name}), got {t.device}")


def _check_probability(name: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")
    return float(value)


def _check_zoneout(cell: str, zoneout, proj_size: int) -> tuple[float, float]:
    """zoneout=p (h and, for the LSTM, c) or (p_h, p_c) for an LSTM -> (p_h, p_c)."""
    if isinstance(zoneout, (tuple, list)):
        if cell != "lstm":
            raise ValueError(f"zoneout: expected one probability (a pair (p_h, p_c) is for an LSTM's h and c), "
                             f"got {zoneout!r}")
        if len(zoneout) != 2:
            raise ValueError(f"zoneout: expected a probability or a pair (p_h, p_c), got {zoneout!r}")
        p_h, p_c = (_check_probability("zoneout", p) for p in zoneout)
    else:
        p_h = p_c = _check_probability("zoneout", zoneout)
    if cell not in ("lstm", "gru") and p_h > 0:
        raise ValueError(f"zoneout: supported by LSTM, GRU and their LayerNorm variants, not {cell}")
    if proj_size > 0 and (p_h > 0 or p_c > 0):
        raise ValueError("zoneout: not supported together with proj_size (the zoneout kernels have no projection)")
    return (p_h, p_c if cell == "lstm" else 0.0)


def _draw_zoneout(zoneout: tuple[float, float], cell: str, shape: tuple, device):
    """Zoneout keep-masks (h, c) of `shape` from torch's default generator; None where p is 0 (c: LSTM only)."""
    p_h, p_c = zoneout
    draw = lambda p: None if p == 0 else torch.empty(shape, device=device).bernoulli_(p)  # noqa: E731
    return draw(p_h), (draw(p_c) if cell == "lstm" else None)


def _reject_extra_kwargs(name: str, kwargs: dict) -> None:
    if "proj_size" in kwargs:  # torch.nn's GRU / RNN take **kwargs and raise this for proj_size
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
    if kwargs:
        raise TypeError(f"{name}.__init__() got an unexpected keyword argument {next(iter(kwargs))!r}")


def _refuse_script(self):
    # torch.jit.script calls __prepare_scriptable__ on every submodule before compiling: the one place to
    # say, before TorchScript fails deep inside fusedrnn's Python, what to use instead.
    raise RuntimeError(
        f"torch.jit.script cannot compile {type(self).__module__}.{type(self).__qualname__}: fusedrnn's modules "
        "dispatch to kernels from Python. Use torch.jit.trace (records the fusedrnn::rnn_layer op; jit.save/"
        "jit.load work after `import fusedrnn`), torch.compile or torch.export -- or fusedrnn.to_torch(model) "
        "to get torch.nn modules that TorchScript can script")


def _refuse_proxy(value) -> None:
    if isinstance(value, torch.fx.Proxy):
        raise TypeError("torch.fx.symbolic_trace cannot trace into fusedrnn modules (their forward checks "
                        "shapes in Python); trace with fusedrnn.symbolic_trace(model), which keeps them as "
                        "leaf modules, as torch.fx does for torch.nn's RNNs")


# PackedSequence <-> padded batch. torch's pad_packed_sequence / pack_padded_sequence copy one time step at a
# time: at T=1000, B=16, H=128 the pair cost 18 ms around a 36 ms GRU forward (bench/bench_lengths.py). In
# eager mode one scatter (unpack) and one gather (repack) over the packed rows do the same, straight in the
# caller's batch order; on CPU tensors the C++ pair of csrc/cpu/packed_sequence.cpp does each in one pass
# (the index ops' setup alone cost 75-360 us at T=10, B=16 against a ~1 ms forward); under compile or tracing
# torch's functions stay (their shapes are static there).
class _CpuPackedToPadded(torch.autograd.Function):
    """(data [rows, *], batch_sizes, sorted_indices) -> (padded [T, B, *], lengths [B]); its adjoint is the
    repack of the gradient (rows past each end get none)."""

    @staticmethod
    def forward(ctx, data, batch_sizes, sorted_indices):
        ctx.layout = (batch_sizes, sorted_indices)
        padded, lengths = torch.ops.fusedrnn.cpu_packed_to_padded(data, batch_sizes, sorted_indices)
        ctx.mark_non_differentiable(lengths)
        return padded, lengths

    @staticmethod
    def backward(ctx, grad_padded, _grad_lengths):
        # a Function again only when the backward itself is differentiated (create_graph=True)
        if torch.is_grad_enabled():
            return _CpuPaddedToPacked.apply(grad_padded, *ctx.layout), None, None
        return torch.ops.fusedrnn.cpu_padded_to_packed(grad_padded, *ctx.layout), None, None


class _CpuPaddedToPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, padded, batch_sizes, sorted_indices):
        ctx.layout = (batch_sizes, sorted_indices)
        return torch.ops.fusedrnn.cpu_padded_to_packed(padded, batch_sizes, sorted_indices)

    @staticmethod
    def backward(ctx, grad_data):
        if torch.is_grad_enabled():
            return _CpuPackedToPadded.apply(grad_data, *ctx.layout)[0], None, None
        return torch.ops.fusedrnn.cpu_packed_to_padded(grad_data, *ctx.layout)[0], None, None


_PACKED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # the cpu kernel's (16-bit in fp32)
_cpu_packing_ops = None  # C++ packed_to_padded, padded_to_packed, packed_layout, looked up once; () if absent


def _cpu_packing(data: Tensor) -> bool:
    """Whether the C++ pair can take packed data / a padded batch `data` (CPU, a plain tensor outside any
    transform)."""
    global _cpu_packing_ops
    if _cpu_packing_ops is None:
        from ._extension import has_extension
        ops = torch.ops.fusedrnn
        _cpu_packing_ops = (ops.cpu_packed_to_padded, ops.cpu_padded_to_packed, ops.cpu_packed_layout) \
            if has_extension() and hasattr(ops, "cpu_packed_layout") else ()
    from .ops import plain_eager
    return bool(_cpu_packing_ops) and data.device.type == "cpu" and plain_eager(("pack", data))


# lengths= runs packed when (a) its packed rows are at most PACKING_PAYS of the padded ones and (b) the skipped
# rows' multiply-adds (x3 with a backward) reach PACKING_MIN_MACS: the route's fixed cost (the layout, a copy
# each way and their autograd nodes, ~0.2-0.3 ms between RNN calls on the 2 Zen 3 cores here) must be paid by
# the work it skips. Measured there (B=16, H=128, packed / padded cost of the same lengths= call): with no row
# skipped 1.00-1.08x; 0.92-1.04x at 91% of the rows, 0.86-0.96x at 81%, 0.78-0.96x at 72% (T 10 / 100);
# at T=10, 62% of the rows, LSTM forward (8M multiply-adds skipped) 1.04-1.09x, forward+backward 0.88-0.93x.
PACKING_PAYS = 0.85
PACKING_MIN_MACS = 1 << 24


def _packing_pays(rows: int, T: int, B: int, row_macs: int, backward: bool) -> bool:
    """Whether `lengths=` runs faster packed (the steps past each end skipped, a copy more each way) than
    padded; rows: the packed rows (the sum of the lengths), row_macs: one row's multiply-adds through every
    layer."""
    skipped = T * B - rows
    return rows <= PACKING_PAYS * T * B and skipped * row_macs * (3 if backward else 1) >= PACKING_MIN_MACS


def _differentiated(t: Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


# The C++ pair with autograd only where a gradient flows (an autograd.Function's apply costs ~20 us).
def _to_packed(padded: Tensor, batch_sizes: Tensor, sorted_indices: Optional[Tensor]) -> Tensor:
    layout = (padded, batch_sizes, sorted_indices)
    return _CpuPaddedToPacked.apply(*layout) if _differentiated(padded) else _cpu_packing_ops[1](*layout)


def _to_padded(data: Tensor, batch_sizes: Tensor, sorted_indices: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    layout = (data, batch_sizes, sorted_indices)
    return _CpuPackedToPadded.apply(*layout) if _differentiated(data) else _cpu_packing_ops[0](*layout)


def _integer_lengths(lengths: Tensor, batch: int) -> bool:
    """Whether `lengths` is what the C++ layout takes: a 1-D integer CPU tensor of one length per sequence."""
    return lengths.device.type == "cpu" and lengths.dim() == 1 and lengths.numel() == batch and \
        not (lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool)


def pack_padded_sequence(input: Tensor, lengths, batch_first: bool = False,
                         enforce_sorted: bool = True) -> PackedSequence:
    """torch.nn.utils.rnn.pack_padded_sequence, the same PackedSequence out; on CPU tensors two C++ calls (the
    layout, the copy) instead of torch's copy per time step (0.3-50 ms at B=16, H=128, T 10-1000, as much as
    the RNN call itself). Anything the fast path does not take -- other devices, transforms, a length out of
    range or unsorted under enforce_sorted -- goes to torch's function, which raises its own errors."""
    packed = _cpu_pack(input, lengths, batch_first, enforce_sorted)
    if packed is not None:
        return packed
    return torch.nn.utils.rnn.pack_padded_sequence(input, lengths, batch_first, enforce_sorted)


def _cpu_pack(input, lengths, batch_first: bool, enforce_sorted: bool) -> Optional[PackedSequence]:
    """pack_padded_sequence by the C++ pair, or None where it does not apply (see pack_padded_sequence)."""
    if not (isinstance(input, Tensor) and input.dim() >= 2 and _cpu_packing(input)):
        return None
    lens = lengths
    if not isinstance(lens, Tensor):
        try:
            lens = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError):  # torch's function gives its own message for it
            return None
    if not _integer_lengths(lens, input.shape[0] if batch_first else input.shape[1]):
        return None
    T = input.shape[1] if batch_first else input.shape[0]
    batch_sizes, sorted_indices, unsorted_indices = _cpu_packing_ops[2](lens, T, enforce_sorted)
    if batch_sizes.numel() == 0:  # lengths torch's function refuses
        return None
    x = input.transpose(0, 1) if batch_first else input
    x = x.narrow(0, 0, batch_sizes.shape[0])
    if enforce_sorted:
        sorted_indices = unsorted_indices = None
    return PackedSequence(_to_packed(x, batch_sizes, sorted_indices), batch_sizes, sorted_indices, unsorted_indices)


def pad_packed_sequence(sequence: PackedSequence, batch_first: bool = False, padding_value: float = 0.0,
                        total_length: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """torch.nn.utils.rnn.pad_packed_sequence, the same (padded, lengths) out; on CPU tensors one C++ pass
    instead of torch's copy per time step. Other devices, transforms, a nonzero padding_value or a
    total_length that adds steps go to torch's function."""
    if isinstance(sequence, PackedSequence) and padding_value == 0 and _cpu_packing(sequence.data) and \
            total_length in (None, sequence.batch_sizes.shape[0]):
        padded, lengths = _to_padded(sequence.data, sequence.batch_sizes, sequence.sorted_indices)
        return (padded.transpose(0, 1) if batch_first else padded), lengths
    return torch.nn.utils.rnn.pad_packed_sequence(sequence, batch_first, padding_value, total_length)


def _packed_positions(packed: PackedSequence) -> Tensor:
    """For each row of packed.data, in order, its flat index t * B + b into the padded [T, B] batch in the
    caller's order (b = sorted_indices[rank])."""
    batch_sizes = packed.batch_sizes
    B = int(batch_sizes[0])
    ranks = torch.arange(B)
    valid = ranks.unsqueeze(0) < batch_sizes.unsqueeze(1)  # [T, B] in sorted order: the packed rows, time-major
    batch = ranks if packed.sorted_indices is None else packed.sorted_indices.cpu()
    flat = torch.arange(batch_sizes.shape[0]).unsqueeze(1) * B + batch.unsqueeze(0)  # [T, B] caller positions
    return flat[valid].to(packed.data.device)


def _unpack(packed: PackedSequence):
    """-> (x [T, B, *] in the caller's batch order, lengths [B] on x's device, how to repack: the packed rows'
    positions, "cpu" (the C++ pair) or None (torch's functions))."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        x, lengths = pad_packed_sequence(packed)
        return x, lengths.to(x.device), None
    if _cpu_packing(packed.data):
        x, lengths = _to_padded(packed.data, packed.batch_sizes, packed.sorted_indices)
        return x, lengths, "cpu"
    data, batch_sizes = packed.data, packed.batch_sizes
    T, B = batch_sizes.shape[0], int(batch_sizes[0])
    positions = _packed_positions(packed)
    rest = tuple(data.shape[1:])
    x = data.new_zeros((T * B,) + rest).index_copy(0, positions, data).view((T, B) + rest)
    lengths = (batch_sizes.unsqueeze(1) > torch.arange(B).unsqueeze(0)).sum(0)  # [B], sorted order
    if packed.unsorted_indices is not None:
        lengths = lengths[packed.unsorted_indices.cpu()]
    return x, lengths.to(data.device), positions


def _repack(y: Tensor, packed: PackedSequence, lengths: Tensor, positions: Union[Tensor, str, None]) -> Tensor:
    """The packed data of y [T, B, *] (caller's batch order), laid out as `packed`'s."""
    if isinstance(positions, str):
        return _to_packed(y, packed.batch_sizes, packed.sorted_indices)
    if positions is None:
        sorted_y = y if packed.sorted_indices is None else y.index_select(1, packed.sorted_indices)
        sorted_lengths, _ = torch.sort(lengths.cpu(), descending=True)
        return pack_padded_sequence(sorted_y, sorted_lengths, enforce_sorted=True).data
    return y.reshape((-1,) + tuple(y.shape[2:])).index_select(0, positions)


def _reset_parameters(module: nn.Module) -> None:
    """torch.nn's draw for the RNN weights and biases (uniform in +-1/sqrt(H), in registration order, so the same
    seed gives torch.nn's values); LayerNorm gains 1 and shifts 0, with no draw."""
    stdv = 1.0 / math.sqrt(module.hidden_size) if module.hidden_size > 0 else 0
    for name, weight in module.named_parameters():
        if name.startswith("ln_"):
            nn.init.zeros_(weight) if name.startswith("ln_c_bias") else nn.init.ones_(weight)
        else:
            nn.init.uniform_(weight, -stdv, stdv)


def _regularisation_repr(module: nn.Module) -> str:
    """The zoneout / dropconnect part of extra_repr (empty when both are off)."""
    s = ""
    if module.zoneout != (0.0, 0.0):
        s += f", zoneout={module.zoneout[0] if module.zoneout[0] == module.zoneout[1] else module.zoneout}"
    if module.dropconnect != 0:
        s += f", dropconnect={module.dropconnect}"
    return s


class _RecurrentLayers(nn.Module):
    """Shared body of LSTM, GRU and RNN (torch.nn.RNNBase's surface, not its class)."""

    __prepare_scriptable__ = _refuse_script

    _mode_name = ""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, merge_mode: str = "concat", zoneout=0.0,
                 dropconnect: float = 0.0, layer_norm: bool = False) -> None:
        super().__init__()
        # torch.nn.RNNBase's checks, in its order and with its wording (its tests match the messages)
        if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1):
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             "element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers=1",
                          stacklevel=3)
        _check_bool("bias", bias)
        _check_bool("batch_first", batch_first)
        _check_positive_int("input_size", input_size)
        _check_positive_int("hidden_size", hidden_size)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int):
            # torch.nn fails later on range(num_layers) with a TypeError
            raise TypeError(f"num_layers should be of type int, got: {type(num_layers).__name__}")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if isinstance(proj_size, bool) or not isinstance(proj_size, int):
            # torch.nn fails later in torch.empty with a TypeError
            raise TypeError(f"proj_size should be of type int, got: {type(proj_size).__name__}")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"merge_mode must be one of {', '.join(map(repr, MERGE_MODES))}, got {merge_mode!r}")
        self.mode = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN_TANH", "rnn_relu": "RNN_RELU"}[cell]
        self.cell = cell
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.merge_mode = merge_mode
        self.zoneout = _check_zoneout(cell, zoneout, proj_size)
        self.dropconnect = _check_probability("dropconnect", dropconnect)
        self.layer_norm = layer_norm
        num_directions = 2 if bidirectional else 1
        gate_size = GATES[cell] * hidden_size
        factory = {"device": device, "dtype": dtype}
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(num_directions):
                real_hidden = proj_size if proj_size > 0 else hidden_size
                layer_input = input_size if layer == 0 else real_hidden * num_directions
                suffix = "_reverse" if direction == 1 else ""
                shapes = [("weight_ih", (gate_size, layer_input)), ("weight_hh", (gate_size, real_hidden))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size > 0:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
                if layer_norm:
                    shapes += [(stem, (gate_size,)) for stem in ("ln_ih_weight", "ln_hh_weight")]
                    if cell == "lstm":
                        shapes += [(stem, (hidden_size,)) for stem in ("ln_c_weight", "ln_c_bias")]
                names = []
                for stem, shape in shapes:
                    name = f"{stem}_l{layer}{suffix}"
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    # -- torch.nn.RNNBase surface -------------------------------------------------------------------
    # Every public and private name torch.nn.LSTM / GRU / RNN define beyond nn.Module, with torch.nn's
    # behaviour, so code written against torch.nn's RNNs (init functions, wrappers that call
    # check_forward_args or permute_hidden, pickles) runs unchanged. tests/test_torch_interop.py lists them.
    __constants__ = ["mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                     "bidirectional", "proj_size"]
    __jit_unused_properties__ = ["all_weights"]

    def check_input(self, input: Tensor, batch_sizes: Optional[Tensor]) -> None:
        """torch.nn.RNNBase.check_input: dtype (ValueError), rank and input_size (RuntimeError)."""
        self._check_input(input, 2 if batch_sizes is not None else 3)

    def get_expected_hidden_size(self, input: Tensor, batch_sizes: Optional[Tensor]) -> tuple[int, int, int]:
        if batch_sizes is not None:
            mini_batch = int(batch_sizes[0])
        else:
            mini_batch = input.size(0) if self.batch_first else input.size(1)
        h_out = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (self.num_layers * (2 if self.bidirectional else 1), mini_batch, h_out)

    def check_hidden_size(self, hx: Tensor, expected_hidden_size: tuple[int, int, int],
                          msg: str = "Expected hidden size {}, got {}") -> None:
        if hx.size() != expected_hidden_size:
            raise RuntimeError(msg.format(expected_hidden_size, list(hx.size())))

    def check_forward_args(self, input: Tensor, hidden, batch_sizes: Optional[Tensor]) -> None:
        self.check_input(input, batch_sizes)
        if self.cell == "lstm":
            self.check_hidden_size(hidden[0], self.get_expected_hidden_size(input, batch_sizes),
                                   "Expected hidden[0] size {}, got {}")
            self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                                   "Expected hidden[1] size {}, got {}")
        else:
            self.check_hidden_size(hidden, self.get_expected_hidden_size(input, batch_sizes))

    def permute_hidden(self, hx, permutation: Optional[Tensor]):
        """Reorders the batch dimension (dim 1) of hx -- a tensor, or (h, c) for an LSTM -- by permutation."""
        if permutation is None:
            return hx
        if self.cell == "lstm":
            return hx[0].index_select(1, permutation), hx[1].index_select(1, permutation)
        return hx.index_select(1, permutation)

    # torch.nn keeps weak references to its weights to rebuild cuDNN's flat buffer when they change;
    # fusedrnn reads the parameters at every call, so there is nothing to rebuild.
    @property
    def _flat_weight_refs(self) -> list:
        return [weakref.ref(w) for w in self._flat_weights]

    def _init_flat_weights(self) -> None:
        """No-op (torch.nn rebuilds its flat weight list here; fusedrnn reads the parameters each call)."""

    def _update_flat_weights(self) -> None:
        """No-op, as _init_flat_weights."""

    def _weights_have_changed(self) -> bool:
        """Always False: nothing is cached from the weights, so nothing can be stale."""
        return False

    reset_parameters = _reset_parameters

    def flatten_parameters(self) -> None:
        """No-op: fusedrnn needs no flat weight buffer (kept so code written for torch.nn runs unchanged)."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _flat_weights(self) -> list[Tensor]:
        params = self._parameters  # one dict lookup each; getattr only for swapped-in plain attributes
        return [params[name] if name in params else getattr(self, name) for name in self._flat_weights_names]

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.merge_mode != "concat":
            s += ", merge_mode={merge_mode!r}"
        return s.format(**self.__dict__) + _regularisation_repr(self)

    # -- forward ------------------------------------------------------------------------------------
    def _layer_weights(self, layer: int, direction: int):
        # getattr, not a cached list: torch.func.functional_call and parametrizations swap the attributes
        suffix = "_reverse" if direction == 1 else ""
        params = self._parameters
        names = [f"{stem}_l{layer}{suffix}" for stem in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")]
        # _parameters first (one dict lookup, as nn.Module.__getattr__ would do after three misses)
        return tuple(params[n] if n in params else getattr(self, n, None) for n in names)

    def _needs_ext(self) -> bool:
        """Whether the layers run fusedrnn::rnn_layer_ext: layer norm, or zoneout while training."""
        return self.layer_norm or (self.training and self.zoneout != (0.0, 0.0))

    def _plain_torch_layers(self) -> bool:
        """Whether a forward computes exactly torch.nn's RNN (no norm, zoneout or DropConnect in force)."""
        return not self._needs_ext() and not (self.training and self.dropconnect > 0)

    def _layer_norms(self, layer: int, direction: int) -> tuple:
        """(ln_ih, ln_hh, ln_c_weight, ln_c_bias) of one layer and direction; Nones without layer norm."""
        if not self.layer_norm:
            return None, None, None, None
        suffix = "_reverse" if direction == 1 else ""
        names = [f"{stem}_l{layer}{suffix}" for stem in ("ln_ih_weight", "ln_hh_weight", "ln_c_weight", "ln_c_bias")]
        return tuple(getattr(self, n, None) for n in names)

    def _zoneout_masks(self, x: Tensor, hidden: int):
        """Zoneout keep-masks [T, B, H] for h (and c), drawn from torch's default generator in training;
        (None, None) in eval, where zoneout is off."""
        if not self.training:
            return None, None
        return _draw_zoneout(self.zoneout, self.cell, (x.shape[0], x.shape[1], hidden), x.device)

    def _normalise_lengths_arg(self, lengths: LengthsLike, x: Tensor) -> Optional[Tensor]:
        return None if lengths is None else self._normalise_lengths(lengths, x)

    @staticmethod
    def _normalise_lengths(lengths: LengthsLike, x: Tensor) -> Tensor:
        if not isinstance(lengths, Tensor):
            try:
                lengths = torch.as_tensor(list(lengths))  # no dtype=: floats must fail, not truncate
            except (TypeError, ValueError) as e:
                raise TypeError(f"lengths: expected a 1-D integer tensor or a list of ints, got {lengths!r}") from e
        if lengths.device.type not in ("cpu", x.device.type) or (
                lengths.device.type != "cpu" and lengths.device != x.device):
            raise ValueError(f"lengths: expected a tensor on the CPU or on the input's device {x.device}, "
                             f"got {lengths.device}")
        if lengths.dim() != 1:
            raise ValueError(f"lengths: expected a 1-D tensor [B], got shape {list(lengths.shape)}")
        # dtype, shape and values: functional.rnn_layer(_ext) checks them on every call, before any work
        return lengths.to(x.device)

    def _check_input(self, x: Tensor, expected_dim: int) -> None:
        """torch.nn.RNNBase.check_input: dtype (ValueError), then rank and input_size (RuntimeError)."""
        weight = self.weight_ih_l0
        if x.dtype != weight.dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(f"RNN input dtype ({x.dtype}) does not match weight dtype ({weight.dtype}). "
                             f"Convert input: input.to({weight.dtype}), or convert model: model.to({x.dtype})")
        if x.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {x.dim()}")
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {x.shape[-1]}")
        if x.device != weight.device:
            raise RuntimeError(f"input must be on device {weight.device} (the device of the module's parameters), "
                               f"got {x.device}")

    def _initial_state(self, hx: Optional[Tensor], x: Tensor, name: str, size: int,
                       batch: Optional[int] = None) -> Tensor:
        """h0 or c0 as [L*D, B, size] (hx already 3-D: unbatched input's is unsqueezed), checked as torch.nn
        checks it (the message names the size torch.nn names: "hidden", "hidden[0]", "hidden[1]"). B: batch,
        else x.shape[1]."""
        expected = (self.num_layers * (2 if self.bidirectional else 1), x.shape[1] if batch is None else batch,
                    size)
        if hx is None:
            return x.new_zeros(expected)
        if tuple(hx.shape) != expected:
            raise RuntimeError(f"Expected {name} size {expected}, got {list(hx.shape)}")
        _check_dtype_device(name, hx, x, "input")
        return hx

    def _split_hx(self, hx):
        """-> (h0, c0) as given (None when hx is None), each a Tensor; c0 None for GRU / RNN."""
        if hx is None:
            return None, None
        if self.cell == "lstm":
            if not isinstance(hx, (tuple, list)):
                raise TypeError(f"hx: an LSTM expects a tuple (h_0, c_0) or None, got {type(hx).__name__}")
            if len(hx) != 2:
                raise RuntimeError("lstm expects two hidden states")
            h0, c0 = hx
            for i, t in enumerate((h0, c0)):
                if not isinstance(t, Tensor):
                    raise TypeError(f"hx[{i}]: expected a Tensor, got {type(t).__name__}")
            return h0, c0
        if not isinstance(hx, Tensor):
            raise TypeError(f"hx: expected a Tensor or None, got {type(hx).__name__}")
        return hx, None

    def _check_hx_rank(self, h0, c0, want: int) -> None:
        kind = "batched 3-D" if want == 3 else "unbatched 2-D"
        if self.cell == "lstm":
            if h0.dim() != want or c0.dim() != want:
                raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                   f"({h0.dim()}-D, {c0.dim()}-D) tensors")
        elif h0.dim() != want:
            raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {h0.dim()}-D tensor")

    def _run(self, x: Tensor, h0: Tensor, c0: Optional[Tensor], lengths: Optional[Tensor],
             batch_sizes: Optional[Tensor] = None):
        """All layers. With batch_sizes, x is a PackedSequence's data and the states are in its sorted order
        (see _forward_packed)."""
        num_directions = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                k = layer * num_directions + direction
                w_ih, w_hh, b_ih, b_hh, w_hr = self._layer_weights(layer, direction)
                if self.dropconnect > 0 and self.training:
                    # DropConnect: one mask on W_hh for the whole sequence (and batch), scaled as F.dropout.
                    # Masking the weight costs one pass over G*H*H values per call, against T*B*G*H*H
                    # multiply-adds of the recurrence, so it is not fused: every backend runs it unchanged.
                    w_hh = F.dropout(w_hh, self.dropconnect, training=True)
                # select, not h0[k]: Python indexing costs ~5 us a call, select ~1
                h0k, c0k = h0.select(0, k), None if c0 is None else c0.select(0, k)
                if batch_sizes is not None:
                    y, h, c = run_packed_layer(self.cell, layer_input, batch_sizes, h0k, c0k, w_ih, w_hh, b_ih,
                                               b_hh, w_hr, direction == 1)
                elif self._needs_ext():
                    zoneout_h, zoneout_c = self._zoneout_masks(layer_input, h0k.shape[-1])
                    y, h, c = rnn_layer_ext(self.cell, layer_input, h0k, c0k, w_ih, w_hh, b_ih, b_hh,
                                            *self._layer_norms(layer, direction), zoneout_h, zoneout_c,
                                            reverse=direction == 1, lengths=lengths)
                else:
                    y, h, c = rnn_layer(self.cell, layer_input, h0k, c0k, w_ih, w_hh, b_ih, b_hh, w_hr,
                                        reverse=direction == 1, lengths=lengths)
                outputs.append(y)
                h_n.append(h)
                c_n.append(c)
            if num_directions == 1:
                layer_input = outputs[0]
            elif layer == self.num_layers - 1 and self.merge_mode != "concat":
                # only the last layer's output is merged (Keras Bidirectional): inner layers keep torch's
                # concatenated input, so the weights stay torch.nn-shaped
                layer_input = _merge_directions(outputs[0], outputs[1], self.merge_mode)
            else:
                layer_input = torch.cat(outputs, -1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        stack = lambda states: states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states)  # noqa: E731
        return layer_input, stack(h_n), (stack(c_n) if c0 is not None else None)

    def _in_place_ok(self, data: Tensor, h0, c0, batch_sizes: Optional[Tensor] = None) -> bool:
        """Whether the layers can run on packed `data` in place (ops.run_packed_layer): CPU tensors, the cpu
        kernel chosen (use_backend("cpu"), or "auto" where it picks cpu for variable lengths), a cell it runs
        (not the LayerNorm / zoneout ones), plain eager (no compile, tracing, transform, forward AD or
        autocast). Otherwise _forward unpacks."""
        if data.device.type != "cpu" or data.dtype not in _PACKED_DTYPES or self._needs_ext() or \
                data.shape[0] == 0 or data.shape[-1] == 0 or self.hidden_size == 0 or \
                (batch_sizes is not None and batch_sizes.numel() == 0) or \
                torch._C._is_any_autocast_enabled() or forward_ad._current_level >= 0:
            return False
        from .backends import auto_takes_cpu_kernel_for_lengths, current_backend
        setting = current_backend()
        if not (setting == "cpu" or (setting == "auto" and auto_takes_cpu_kernel_for_lengths())) or \
                not _cpu_packing(data):
            return False
        return plain_eager((self.cell, data, h0, c0, batch_sizes, *self._flat_weights))

    def _forward_packed(self, packed: PackedSequence, h0: Optional[Tensor], c0: Optional[Tensor]):
        """The module on a PackedSequence, its data never unpacked (see _run_packed)."""
        if packed.sorted_indices is not None:  # a hand-made one must be a permutation, as unpacking checked
            torch.ops.fusedrnn.cpu_check_packed_layout(packed.batch_sizes, packed.sorted_indices,
                                                       packed.data.shape[0])
        batch = int(packed.batch_sizes[0])
        states_given = h0 is not None
        if states_given:
            self._check_hx_rank(h0, c0, 3)
        h_out = self.proj_size if self.proj_size > 0 else self.hidden_size
        h0 = self._initial_state(h0, packed.data, "hidden[0]" if self.cell == "lstm" else "hidden", h_out, batch)
        if self.cell == "lstm":
            c0 = self._initial_state(c0, packed.data, "hidden[1]", self.hidden_size, batch)
        y, h_n, c_n = self._run_packed(packed, h0, c0, states_given)
        output = PackedSequence(y, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        return output, (h_n if c_n is None else (h_n, c_n))

    def _run_packed(self, packed: PackedSequence, h0: Tensor, c0: Optional[Tensor], states_given: bool):
        """(y data, h_n, c_n) of every layer on packed.data in place; h0 / c0 [L*D, B, *] in the caller's
        order are put in the sequence's sorted order (as torch.nn's permute_hidden; zeros need not be), h_n /
        c_n put back."""
        if states_given and self.cell == "lstm":
            h0, c0 = self.permute_hidden((h0, c0), packed.sorted_indices)
        elif states_given:
            h0 = self.permute_hidden(h0, packed.sorted_indices)
        y, h_n, c_n = self._run(packed.data, h0, c0, None, batch_sizes=packed.batch_sizes)
        if c_n is not None:
            h_n, c_n = self.permute_hidden((h_n, c_n), packed.unsorted_indices)
        else:
            h_n = self.permute_hidden(h_n, packed.unsorted_indices)
        return y, h_n, c_n

    def _row_macs(self) -> int:
        """Multiply-adds of one batch row of one step through every layer and direction (forward)."""
        G, H = GATES[self.cell], self.hidden_size
        H_out = self.proj_size or H
        D = 2 if self.bidirectional else 1
        per_row = 0
        for layer in range(self.num_layers):
            inputs = self.input_size if layer == 0 else D * H_out
            per_row += D * (G * H * (inputs + H_out) + (H * H_out if self.proj_size else 0))
        return per_row

    def _run_lengths_packed(self, x: Tensor, h0: Tensor, c0: Optional[Tensor], lengths: Tensor, states_given: bool):
        """`lengths=` on the padded batch x [T, B, I] as a PackedSequence run in place (pack, layers, unpack:
        one C++ pass each), when it pays: the layers then skip every step past each sequence's end. None where
        it does not apply (see _in_place_ok; a length of 0 or out of range, which the padded path handles
        or refuses) or does not pay."""
        T, B = x.shape[0], x.shape[1]
        if not _integer_lengths(lengths, B):
            return None  # what the padded path refuses, it refuses with its own message
        backward = _differentiated(x) or (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (h0, c0, *self._flat_weights)))
        row_macs = self._row_macs()
        if T * B * row_macs * (3 if backward else 1) < PACKING_MIN_MACS:  # could not pay whatever the lengths
            return None
        if not _packing_pays(int(lengths.sum()), T, B, row_macs, backward):
            return None
        if not self._in_place_ok(x, h0, c0):
            return None
        packed = _cpu_pack(x, lengths, batch_first=False, enforce_sorted=False)
        if packed is None:  # a length of 0 or past T: the padded path takes or refuses it
            return None
        y_data, h_n, c_n = self._run_packed(packed, h0, c0, states_given)
        y = _to_padded(y_data, packed.batch_sizes, packed.sorted_indices)[0]
        if y.shape[0] < T:  # every sequence ended before T: the steps after are zeros, as the padded path gives
            y = torch.cat([y, y.new_zeros((T - y.shape[0],) + tuple(y.shape[1:]))])
        return y, h_n, c_n

    def _forward(self, input, hx, lengths: LengthsLike):
        # torch.nn's checks in torch.nn's order: input rank, hx rank, input dtype and size, hx sizes, then
        # the sequence length (checked by torch's kernel, so after everything else)
        h0, c0 = self._split_hx(hx)
        packed = None
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("lengths: must be None for a PackedSequence input, which carries its own lengths")
            packed = input
            self._check_input(input.data, 2)
            if self._in_place_ok(input.data, h0, c0, input.batch_sizes):
                return self._forward_packed(input, h0, c0)
            x, lengths, packed_rows = _unpack(input)  # batch in the caller's order, as hx
            is_batched = True
        else:
            if not isinstance(input, Tensor):
                _refuse_proxy(input)
                raise TypeError(f"input: expected a Tensor or PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                tensor = " tensor" if self.cell.startswith("rnn") else ""
                raise ValueError(f"{self._mode_name}: Expected input to be 2D or 3D, got {input.dim()}D{tensor} "
                                 "instead")
            is_batched = input.dim() == 3
            if not is_batched and lengths is not None:
                raise ValueError("lengths: not supported for unbatched (2-D) input; add a batch dimension")
            if h0 is not None:
                self._check_hx_rank(h0, c0, 3 if is_batched else 2)
            if not is_batched:
                x = input.unsqueeze(1)
                h0 = None if h0 is None else h0.unsqueeze(1)
                c0 = None if c0 is None else c0.unsqueeze(1)
            else:
                x = input.transpose(0, 1) if self.batch_first else input
            self._check_input(x, 3)
        h_out = self.proj_size if self.proj_size > 0 else self.hidden_size
        if self.cell == "lstm":
            h0 = self._initial_state(h0, x, "hidden[0]", h_out)
            c0 = self._initial_state(c0, x, "hidden[1]", self.hidden_size)
        else:
            h0 = self._initial_state(h0, x, "hidden", h_out)
        if x.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if packed is None:
            lengths = self._normalise_lengths_arg(lengths, x)
        done = None
        if lengths is None and (self.merge_mode == "concat" or not self.bidirectional) and \
                self._plain_torch_layers():
            done = lane.module_call(self, x, h0, c0)  # the whole module in torch's kernel, when auto says so
        elif lengths is not None and packed is None:
            done = self._run_lengths_packed(x, h0, c0, lengths, hx is not None)
        y, h_n, c_n = done if done is not None else self._run(x, h0, c0, lengths)

        if packed is not None:
            output = PackedSequence(_repack(y, packed, lengths, packed_rows), packed.batch_sizes,
                                    packed.sorted_indices, packed.unsorted_indices)
        elif not is_batched:
            output = y.squeeze(1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        else:
            output = y.transpose(0, 1) if self.batch_first else y
        return output, (h_n if c_n is None else (h_n, c_n))


class LSTM(_RecurrentLayers):
    """torch.nn.LSTM, on fusedrnn kernels. forward(input, hx=None, lengths=None) -> (output, (h_n, c_n)).

    merge_mode ("concat" | "sum" | "mul" | "ave", default "concat" as torch): how a bidirectional module
    combines the two directions' outputs of the LAST layer (as Keras' Bidirectional); output features are
    then H_out instead of 2 * H_out. Inner layers stay concatenated and h_n is unchanged, so parameters and
    state_dict are exactly torch's. Ignored when bidirectional=False.
    """

    _mode_name = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, merge_mode: str = "concat", zoneout=0.0,
                 dropconnect: float = 0.0) -> None:
        super().__init__("lstm", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype, merge_mode, zoneout, dropconnect)

    def get_expected_cell_size(self, input: Tensor, batch_sizes: Optional[Tensor]) -> tuple[int, int, int]:
        if batch_sizes is not None:
            mini_batch = int(batch_sizes[0])
        else:
            mini_batch = input.size(0) if self.batch_first else input.size(1)
        return (self.num_layers * (2 if self.bidirectional else 1), mini_batch, self.hidden_size)

    def forward(self, input, hx=None, lengths: LengthsLike = None):
        return self._forward(input, hx, lengths)


class GRU(_RecurrentLayers):
    """torch.nn.GRU, on fusedrnn kernels. forward(input, hx=None, lengths=None) -> (output, h_n).

    merge_mode ("concat" | "sum" | "mul" | "ave", default "concat" as torch): how a bidirectional module
    combines the two directions' outputs of the LAST layer (as Keras' Bidirectional); output features are
    then H_out instead of 2 * H_out. Inner layers stay concatenated and h_n is unchanged, so parameters and
    state_dict are exactly torch's. Ignored when bidirectional=False.
    """

    _mode_name = "GRU"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, merge_mode: str = "concat", zoneout: float = 0.0,
                 dropconnect: float = 0.0, **kwargs) -> None:
        _reject_extra_kwargs("GRU", kwargs)
        super().__init__("gru", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         0, device, dtype, merge_mode, zoneout, dropconnect)

    def forward(self, input, hx=None, lengths: LengthsLike = None):
        return self._forward(input, hx, lengths)


class RNN(_RecurrentLayers):
    """torch.nn.RNN (Elman, tanh or relu), on fusedrnn kernels. forward(input, hx=None, lengths=None)
    -> (output, h_n).

    merge_mode ("concat" | "sum" | "mul" | "ave", default "concat" as torch): how a bidirectional module
    combines the two directions' outputs of the LAST layer (as Keras' Bidirectional); output features are
    then H_out instead of 2 * H_out. Inner layers stay concatenated and h_n is unchanged, so parameters and
    state_dict are exactly torch's. Ignored when bidirectional=False.
    """

    _mode_name = "RNN"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, merge_mode: str = "concat", dropconnect: float = 0.0, **kwargs) -> None:
        _reject_extra_kwargs("RNN", kwargs)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, merge_mode, 0.0, dropconnect)

    def forward(self, input, hx=None, lengths: LengthsLike = None):
        return self._forward(input, hx, lengths)


_ZONEOUT_DOC = """
    zoneout: probability that a hidden unit keeps its previous value at a step (Krueger et al. 2016), drawn
    per step, sequence and unit from torch's default generator in training (reproducible with
    torch.manual_seed); off in eval. For an LSTM it applies to h and c alike, or give (p_h, p_c)."""
_DROPCONNECT_DOC = """
    dropconnect: DropConnect on W_hh (Wan et al. 2013; AWD-LSTM's weight drop): in training each call draws
    one mask over the recurrent weights, fixed for the whole sequence and batch, scaled by 1/(1-p) as
    F.dropout; off in eval. Adds no parameter.
"""
_REGULARISATION_DOC = _ZONEOUT_DOC + _DROPCONNECT_DOC
LSTM.__doc__ += _REGULARISATION_DOC
GRU.__doc__ += _REGULARISATION_DOC
RNN.__doc__ += _DROPCONNECT_DOC


class LayerNormLSTM(_RecurrentLayers):
    """LSTM with layer normalisation (Ba et al. 2016), as haste's LayerNormLSTM; not in torch.nn.

    Same arguments as fusedrnn.LSTM but proj_size and merge_mode. Per layer and direction, besides torch.nn's
    weight_ih / weight_hh / bias_ih / bias_hh (whose biases act as the norms' shifts):
      ln_ih_weight_l{k}[_reverse] [4H]  gain of LN(W_ih x)
      ln_hh_weight_l{k}[_reverse] [4H]  gain of LN(W_hh h)
      ln_c_weight_l{k}[_reverse]  [H]   gain and
      ln_c_bias_l{k}[_reverse]    [H]   shift of LN(c) before the output tanh: h = o * tanh(LN(c))
    Gains start at 1, shifts at 0; the other weights as torch.nn.LSTM (same seed, same values).
    Math: fusedrnn.reference.rnn_layer_ext. forward(input, hx=None, lengths=None) -> (output, (h_n, c_n)).
    """ + _REGULARISATION_DOC

    _mode_name = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None, zoneout=0.0, dropconnect: float = 0.0) -> None:
        super().__init__("lstm", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         0, device, dtype, "concat", zoneout, dropconnect, layer_norm=True)

    get_expected_cell_size = LSTM.get_expected_cell_size

    def forward(self, input, hx=None, lengths: LengthsLike = None):
        return self._forward(input, hx, lengths)


class LayerNormGRU(_RecurrentLayers):
    """GRU with layer normalisation, as haste's LayerNormGRU; not in torch.nn.

    Same arguments as fusedrnn.GRU but merge_mode. Per layer and direction, besides torch.nn's weights:
      ln_ih_weight_l{k}[_reverse] [3H]  gain of LN(W_ih x)   (then + bias_ih)
      ln_hh_weight_l{k}[_reverse] [3H]  gain of LN(W_hh h)   (then + bias_hh, inside r * (...) for n)
    Math: fusedrnn.reference.rnn_layer_ext. forward(input, hx=None, lengths=None) -> (output, h_n).
    """ + _REGULARISATION_DOC

    _mode_name = "GRU"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None, zoneout: float = 0.0, dropconnect: float = 0.0) -> None:
        super().__init__("gru", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         0, device, dtype, "concat", zoneout, dropconnect, layer_norm=True)

    def forward(self, input, hx=None, lengths: LengthsLike = None):
        return self._forward(input, hx, lengths)


# -------------------------------------------------------------------------------------------------------
# Cells: one step, as a T=1 layer call (so they run on the same backends and compile the same way).
# -------------------------------------------------------------------------------------------------------
class _Cell(nn.Module):
    _mode_name = ""
    __constants__ = ["input_size", "hidden_size", "bias"]
    __prepare_scriptable__ = _refuse_script

    def __init__(self, cell: str, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        # Like torch.nn.RNNCellBase: no checks of the sizes (0 is valid: an empty input or state; a negative
        # or non-int size fails in torch.empty exactly as in torch.nn), bias kept as given.
        super().__init__()
        self.cell = cell
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        factory = {"device": device, "dtype": dtype}
        gate_size = GATES[cell] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty((gate_size, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((gate_size, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gate_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(gate_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    reset_parameters = _reset_parameters

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if "bias" in self.__dict__ and self.bias is not True:
            s += ", bias={bias}"
        if "nonlinearity" in self.__dict__ and self.nonlinearity != "tanh":
            s += ", nonlinearity={nonlinearity}"
        return s.format(**self.__dict__)

    _plain = True  # the step is torch.nn's cell (the eager lane may run torch's kernel)

    def _one_step(self, x: Tensor, h: Tensor, c: Optional[Tensor], w_ih, w_hh, b_ih, b_hh):
        """(h_1, c_1 or None) of one step; x [1, B, I] and states [B, *] are checked."""
        _, h, c = rnn_layer(self.cell, x, h, c, w_ih, w_hh, b_ih, b_hh)
        return h, c

    def _step(self, input: Tensor, states: list):
        """One step; `states` = [h] or [h, c] as given (None: zeros). torch.nn's checks in torch.nn's order:
        ranks (ValueError), then input_size and each state's batch size and hidden_size (RuntimeError, the
        wording of ATen's check_rnn_cell_forward_*), then dtypes and devices (RuntimeError)."""
        # Fast path for the common call (a batched input and well-formed states or None): the same checks
        # as below, passed or not taken, in a few comparisons -- decoding loops call a cell once per token,
        # and torch.nn's cells make these checks in C++ (bench/bench_overhead.py).
        params = self._parameters
        w_ih = params.get("weight_ih")
        if w_ih is None:  # replaced by a plain attribute (torch.func.functional_call) or really None
            w_ih = self.weight_ih
        if type(input) in _PLAIN_TENSORS and input.dim() == 2 and input.size(1) == self.input_size and \
                input.dtype == w_ih.dtype and input.device == w_ih.device:
            batch, hidden = input.size(0), self.hidden_size
            full, zeros = [], None
            for state in states:
                if state is None:  # one zero tensor for h and c, as torch.nn (the kernels never write inputs)
                    state = zeros = input.new_zeros(batch, hidden) if zeros is None else zeros
                elif not (type(state) in _PLAIN_TENSORS and state.dim() == 2 and state.shape[0] == batch and
                          state.shape[1] == hidden and state.dtype == input.dtype and state.device == input.device):
                    break
                full.append(state)
            else:
                w_hh, b_ih, b_hh = params.get("weight_hh"), params.get("bias_ih"), params.get("bias_hh")
                if w_hh is None or b_ih is None:  # see w_ih (bias=False: None either way)
                    w_hh, b_ih, b_hh = self.weight_hh, self.bias_ih, self.bias_hh
                if self._plain:
                    stepped = lane.cell_step(self.cell, input, full[0], full[1] if len(full) > 1 else None, w_ih,
                                             w_hh, b_ih, b_hh)
                    if stepped is not None:
                        return stepped
                return self._one_step(input.unsqueeze(0), full[0], full[1] if len(full) > 1 else None, w_ih, w_hh,
                                      b_ih, b_hh)
        if not isinstance(input, Tensor):
            _refuse_proxy(input)
            raise TypeError(f"input: expected a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{self._mode_name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        for i, state in enumerate(states):
            if state is None:
                continue
            if not isinstance(state, Tensor):
                raise TypeError(f"hx{f'[{i}]' if len(states) > 1 else ''}: expected a Tensor, "
                                f"got {type(state).__name__}")
            if state.dim() not in (1, 2):
                label = f"hx[{i}]" if len(states) > 1 else "hidden"
                raise ValueError(f"{self._mode_name}: Expected {label} to be 1D or 2D, got {state.dim()}D instead")
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        full = [x.new_zeros(x.shape[0], self.hidden_size) if state is None
                else (state if is_batched else state.unsqueeze(0)) for state in states]
        if x.shape[1] != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {x.shape[1]} expected {self.input_size}")
        for i, state in enumerate(full):
            if state.shape[0] != x.shape[0]:
                raise RuntimeError(f"Input batch size {x.shape[0]} doesn't match hidden{i} batch size "
                                   f"{state.shape[0]}")
            if state.dim() >= 2 and state.shape[1] != self.hidden_size:
                raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {state.shape[1]}, "
                                   f"expected {self.hidden_size}")
            if state.dim() != 2:  # a 1-D state for batched input, or a 2-D one for unbatched input
                raise RuntimeError(f"hidden{i}: expected the rank of the input ({input.dim()}-D), got shape "
                                   f"{list(states[i].shape)}")
        _check_dtype_device("input", x, self.weight_ih, "the module's parameters")
        for i, state in enumerate(full):
            _check_dtype_device(f"hidden{i}", state, x, "input")
        c0 = full[1] if self.cell == "lstm" else None
        h, c = self._one_step(x.unsqueeze(0), full[0], c0, self.weight_ih, self.weight_hh, self.bias_ih,
                              self.bias_hh)
        if not is_batched:
            h = h.squeeze(0)
            c = c.squeeze(0) if c is not None else None
        return h, c


class LSTMCell(_Cell):
    """torch.nn.LSTMCell. forward(input, hx=None) -> (h_1, c_1)."""

    _mode_name = "LSTMCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__("lstm", input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx=None):
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError(f"hx: an LSTMCell expects a tuple (h_0, c_0) or None, got {type(hx).__name__}")
        return self._step(input, [None, None] if hx is None else list(hx))


class GRUCell(_Cell):
    """torch.nn.GRUCell. forward(input, hx=None) -> h_1."""

    _mode_name = "GRUCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__("gru", input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, [hx])[0]


class RNNCell(_Cell):
    """torch.nn.RNNCell. forward(input, hx=None) -> h_1."""

    _mode_name = "RNNCell"
    __constants__ = ["input_size", "hidden_size", "bias", "nonlinearity"]

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity: {nonlinearity}. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, [hx])[0]


class _LayerNormCell(_Cell):
    """One step of LayerNormLSTM / LayerNormGRU (parameters as theirs, without the layer suffix)."""

    _plain = False

    def __init__(self, cell: str, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None,
                 zoneout=0.0, dropconnect: float = 0.0) -> None:
        zoneout = _check_zoneout(cell, zoneout, 0)
        dropconnect = _check_probability("dropconnect", dropconnect)
        super().__init__(cell, input_size, hidden_size, bias, device, dtype)
        self.zoneout, self.dropconnect = zoneout, dropconnect
        factory = {"device": device, "dtype": dtype}
        gate_size = GATES[cell] * hidden_size
        self.ln_ih_weight = nn.Parameter(torch.ones(gate_size, **factory))
        self.ln_hh_weight = nn.Parameter(torch.ones(gate_size, **factory))
        if cell == "lstm":
            self.ln_c_weight = nn.Parameter(torch.ones(hidden_size, **factory))
            self.ln_c_bias = nn.Parameter(torch.zeros(hidden_size, **factory))


    def _one_step(self, x, h, c, w_ih, w_hh, b_ih, b_hh):
        if self.training and self.dropconnect > 0:
            w_hh = F.dropout(w_hh, self.dropconnect, training=True)
        zoneout_h = zoneout_c = None
        if self.training:
            zoneout_h, zoneout_c = _draw_zoneout(self.zoneout, self.cell, (x.shape[0], x.shape[1], self.hidden_size),
                                                 x.device)
        _, h, c = rnn_layer_ext(self.cell, x, h, c, w_ih, w_hh, b_ih, b_hh, self.ln_ih_weight, self.ln_hh_weight,
                                getattr(self, "ln_c_weight", None), getattr(self, "ln_c_bias", None), zoneout_h,
                                zoneout_c)
        return h, c

    def extra_repr(self) -> str:
        return super().extra_repr() + _regularisation_repr(self)


class LayerNormLSTMCell(_LayerNormCell):
    """One step of fusedrnn.LayerNormLSTM (parameters ln_ih_weight, ln_hh_weight, ln_c_weight, ln_c_bias besides
    torch.nn.LSTMCell's). forward(input, hx=None) -> (h_1, c_1).""" + _REGULARISATION_DOC

    _mode_name = "LSTMCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None,
                 zoneout=0.0, dropconnect: float = 0.0) -> None:
        super().__init__("lstm", input_size, hidden_size, bias, device, dtype, zoneout, dropconnect)

    forward = LSTMCell.forward


class LayerNormGRUCell(_LayerNormCell):
    """One step of fusedrnn.LayerNormGRU (parameters ln_ih_weight, ln_hh_weight besides torch.nn.GRUCell's).
    forward(input, hx=None) -> h_1.""" + _REGULARISATION_DOC

    _mode_name = "GRUCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None,
                 zoneout: float = 0.0, dropconnect: float = 0.0) -> None:
        super().__init__("gru", input_size, hidden_size, bias, device, dtype, zoneout, dropconnect)

    forward = GRUCell.forward


# -------------------------------------------------------------------------------------------------------
# torch.fx: fusedrnn's modules as leaves, as torch.fx's default Tracer keeps torch.nn's own modules.
# -------------------------------------------------------------------------------------------------------
RECURRENT_MODULES = (LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell, LayerNormLSTM, LayerNormGRU, LayerNormLSTMCell,
                     LayerNormGRUCell)


def is_recurrent(module) -> bool:
    """True for torch.nn's and fusedrnn's recurrent modules (LSTM, GRU, RNN and the three cells).

    fusedrnn's classes are not subclasses of torch.nn.LSTM & co. (Dynamo graph-breaks on any instance of
    torch.nn.RNNBase, so subclassing would cost torch.compile its full graph): code that asks
    `isinstance(m, nn.LSTM)` to find RNNs (init functions, model.apply, freezing) should ask this instead,
    or test both class families."""
    return isinstance(module, RECURRENT_MODULES + (nn.RNNBase, nn.RNNCellBase))


class Tracer(torch.fx.Tracer):
    """A torch.fx Tracer that keeps fusedrnn's recurrent modules as leaf modules (call_module nodes)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, RECURRENT_MODULES) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(root: nn.Module, concrete_args=None) -> torch.fx.GraphModule:
    """torch.fx.symbolic_trace with fusedrnn's modules as leaves (the GraphModule calls them)."""
    graph = Tracer().trace(root, concrete_args)
    name = root.__class__.__name__ if isinstance(root, nn.Module) else root.__name__
    return torch.fx.GraphModule(root, graph, name)


# -------------------------------------------------------------------------------------------------------
# Attention (for seq2seq decoders): plain torch, nothing fused.
# -------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Batched soft attention: Luong "dot" / "general", Bahdanau "additive".

    Attention(query_size, key_size=None, score="dot", attn_size=None, device=None, dtype=None)
      dot:      s = q . k                      (needs query_size == key_size)
      general:  s = q . (W k),  W [query_size, key_size], no bias
      additive: s = v . tanh(W_q q + W_k k),   W_q, W_k [attn_size, *] (W_q with bias), v [attn_size]
                (attn_size defaults to query_size)

    forward(query [B, Hq] or [B, Tq, Hq], keys [B, Tk, Hk], values=None [B, Tk, Hv] (default: keys),
            mask=None [B, Tk] bool, True = valid) -> (context [B, Hv] or [B, Tq, Hv], weights [B, (Tq,) Tk]).
    Masked keys get weight exactly 0; a row whose keys are all masked gets all-zero weights and a zero
    context (not NaN), with finite gradients.
    """

    SCORES = ("dot", "general", "additive")

    def __init__(self, query_size: int, key_size: Optional[int] = None, score: str = "dot",
                 attn_size: Optional[int] = None, device=None, dtype=None) -> None:
        super().__init__()
        if score not in self.SCORES:
            raise ValueError(f"score must be one of {', '.join(map(repr, self.SCORES))}, got {score!r}")
        key_size = query_size if key_size is None else key_size
        _check_positive_int("query_size", query_size)
        _check_positive_int("key_size", key_size)
        if score == "dot" and key_size != query_size:
            raise ValueError(f"score='dot' needs query_size == key_size, got {query_size} and {key_size}")
        self.query_size, self.key_size, self.score = query_size, key_size, score
        factory = {"device": device, "dtype": dtype}
        if score == "general":
            self.linear = nn.Linear(key_size, query_size, bias=False, **factory)
        elif score == "additive":
            attn_size = query_size if attn_size is None else attn_size
            _check_positive_int("attn_size", attn_size)
            self.query_proj = nn.Linear(query_size, attn_size, bias=True, **factory)
            self.key_proj = nn.Linear(key_size, attn_size, bias=False, **factory)
            self.v = nn.Linear(attn_size, 1, bias=False, **factory)
        self.attn_size = attn_size

    def extra_repr(self) -> str:
        s = f"{self.query_size}, {self.key_size}, score={self.score!r}"
        return s + (f", attn_size={self.attn_size}" if self.score == "additive" else "")

    def forward(self, query: Tensor, keys: Tensor, values: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        if query.dim() not in (2, 3):
            raise ValueError(f"query: expected [B, Hq] or [B, Tq, Hq], got shape {list(query.shape)}")
        if keys.dim() != 3:
            raise ValueError(f"keys: expected [B, Tk, Hk], got shape {list(keys.shape)}")
        single = query.dim() == 2
        q = query.unsqueeze(1) if single else query                       # [B, Tq, Hq]
        values = keys if values is None else values
        if self.score == "dot":
            scores = torch.bmm(q, keys.transpose(1, 2))
        elif self.score == "general":
            scores = torch.bmm(q, self.linear(keys).transpose(1, 2))
        else:
            hidden = torch.tanh(self.query_proj(q).unsqueeze(2) + self.key_proj(keys).unsqueeze(1))
            scores = self.v(hidden).squeeze(-1)                           # [B, Tq, Tk]
        if mask is not None:
            if mask.shape != keys.shape[:2]:
                raise ValueError(f"mask: expected shape {list(keys.shape[:2])}, got {list(mask.shape)}")
            valid = mask.to(torch.bool).unsqueeze(1)                       # [B, 1, Tk]
            scores = scores.masked_fill(~valid, -math.inf)
            # a fully masked row would softmax to NaN: give it finite scores, then zero its weights
            scores = scores.masked_fill(~valid.any(-1, keepdim=True), 0.0)
            weights = torch.softmax(scores, -1).masked_fill(~valid, 0.0)
        else:
            weights = torch.softmax(scores, -1)
        context = torch.bmm(weights, values)
        if single:
            return context.squeeze(1), weights.squeeze(1)
        return context, weights
