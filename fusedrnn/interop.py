"""Swap torch.nn recurrent modules for fusedrnn's and back, in a whole model.

    model = fusedrnn.convert(model)    # every torch.nn.LSTM / GRU / RNN / *Cell inside -> fusedrnn's class
    model = fusedrnn.to_torch(model)   # the reverse, e.g. before torch.ao quantization or an ONNX export

Both keep the very same Parameter objects (an optimizer built before the swap keeps working, and tensor
hooks on the parameters stay), the training flag, and the module hooks (forward, pre-forward, backward,
state_dict; the hook dictionaries are shared, so the handles returned before the swap still remove them).
Other attributes set on a module instance by hand are not carried. The replaced module shares its
Parameters with the new one: do not keep training both.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from . import nn as fnn

TORCH_TO_FUSED: dict[type, type] = {
    nn.LSTM: fnn.LSTM, nn.GRU: fnn.GRU, nn.RNN: fnn.RNN,
    nn.LSTMCell: fnn.LSTMCell, nn.GRUCell: fnn.GRUCell, nn.RNNCell: fnn.RNNCell,
}
FUSED_TO_TORCH: dict[type, type] = {fused: torch_cls for torch_cls, fused in TORCH_TO_FUSED.items()}

# A class or a tuple of classes, or a predicate (qualified_name, module) -> bool ("" names the root).
Selector = Union[type, Iterable[type], Callable[[str, nn.Module], bool], None]

# nn.Module's per-instance hook dictionaries; sharing them (not copying) keeps existing handles working
_HOOK_DICTS = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def convert(model: nn.Module, include: Selector = None, exclude: Selector = None,
            convert_subclasses: bool = False) -> nn.Module:
    """Replace every torch.nn.LSTM / GRU / RNN / LSTMCell / GRUCell / RNNCell in `model` by fusedrnn's.

    In place for the children; returns `model`, or the new module when `model` itself is one of them.
    include / exclude: restrict the swap to some modules: a torch.nn class, several, or a predicate
    `(qualified_name, module) -> bool`. A module that occurs several times in the model becomes one fusedrnn
    module. Subclasses (a custom forward, a parametrization) are left alone with a warning naming them, unless
    convert_subclasses=True (their own forward is then lost). Parameters, training flag and hooks carry over:
    see the module docstring.
    """
    return _swap(model, TORCH_TO_FUSED, include, exclude, convert_subclasses, _fused_kwargs)


def to_torch(model: nn.Module, include: Selector = None, exclude: Selector = None,
             convert_subclasses: bool = False) -> nn.Module:
    """The reverse of `convert`: every fusedrnn LSTM / GRU / RNN / cell becomes the torch.nn class.

    A bidirectional module with merge_mode other than "concat" has no torch.nn equivalent: ValueError naming
    it (nothing is swapped then). torch.nn's forward takes no `lengths=`: a model that passes it must pack its
    input instead (torch.nn.utils.rnn.pack_padded_sequence) to run after to_torch.
    """
    return _swap(model, FUSED_TO_TORCH, include, exclude, convert_subclasses, _torch_kwargs)


# -- constructor arguments ----------------------------------------------------------------------------------
def _layer_kwargs(module) -> dict:
    kwargs = {"input_size": module.input_size, "hidden_size": module.hidden_size, "num_layers": module.num_layers,
              "bias": module.bias, "batch_first": module.batch_first, "dropout": module.dropout,
              "bidirectional": module.bidirectional}
    if module.proj_size:
        kwargs["proj_size"] = module.proj_size
    return kwargs


def _cell_kwargs(module) -> dict:
    return {"input_size": module.input_size, "hidden_size": module.hidden_size, "bias": module.bias}


def _common_kwargs(module) -> dict:
    kwargs = _cell_kwargs(module) if isinstance(module, (nn.RNNCellBase, fnn._Cell)) else _layer_kwargs(module)
    if hasattr(module, "nonlinearity"):  # RNN and RNNCell
        kwargs["nonlinearity"] = module.nonlinearity
    return kwargs


def _fused_kwargs(module, path: str) -> dict:
    return _common_kwargs(module)


def _torch_kwargs(module, path: str) -> dict:
    if getattr(module, "bidirectional", False) and getattr(module, "merge_mode", "concat") != "concat":
        raise ValueError(f"to_torch: {_describe(path, module)} uses merge_mode={module.merge_mode!r}, which "
                         "torch.nn has no equivalent of (its bidirectional output is always concatenated)")
    zoneout, dropconnect = getattr(module, "zoneout", (0.0, 0.0)), getattr(module, "dropconnect", 0.0)
    if zoneout != (0.0, 0.0) or dropconnect:
        raise ValueError(f"to_torch: {_describe(path, module)} uses zoneout={zoneout} / dropconnect={dropconnect}, "
                         "which torch.nn has no equivalent of (set them to 0 first to convert it for inference)")
    return _common_kwargs(module)


# -- the walk -----------------------------------------------------------------------------------------------
def _describe(path: str, module: nn.Module) -> str:
    return f"{path or '<root>'} ({type(module).__module__}.{type(module).__qualname__})"


def _matches(selector: Selector, path: str, module: nn.Module, target_cls: type) -> bool:
    if callable(selector) and not isinstance(selector, type):
        return bool(selector(path, module))
    classes = (selector,) if isinstance(selector, type) else tuple(selector)
    # a class names either side of the mapping (nn.LSTM or fusedrnn.LSTM both select LSTMs)
    return any(issubclass(target_cls, c) or issubclass(type(module), c) for c in classes)


def _source_class(module: nn.Module, mapping: dict, convert_subclasses: bool) -> Optional[type]:
    """The mapping's key this module is converted as, or None to leave it."""
    if type(module) in mapping:
        return type(module)
    if convert_subclasses:
        for cls in mapping:
            if isinstance(module, cls):
                return cls
    return None


def _swap(model, mapping, include, exclude, convert_subclasses, make_kwargs):
    # plan everything first, so that an error (merge_mode) leaves the model untouched
    plan: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(old) -> (old, new); a shared module maps once
    slots: list[tuple[nn.Module, str, int]] = []        # (parent, child name, id(old)) to reassign
    skipped: list[str] = []
    visited: set[int] = set()

    def consider(path: str, module: nn.Module) -> bool:
        if id(module) in plan:
            return True
        cls = _source_class(module, mapping, convert_subclasses)
        if cls is None:
            if isinstance(module, tuple(mapping)):
                skipped.append(_describe(path, module))
            return False
        target = mapping[cls]
        if include is not None and not _matches(include, path, module, target):
            return False
        if exclude is not None and _matches(exclude, path, module, target):
            return False
        kwargs = make_kwargs(module, path)
        new = _build(target, kwargs, module, path)
        if new is None:
            skipped.append(_describe(path, module) + " (its parameters are not the plain torch.nn ones)")
            return False
        plan[id(module)] = (module, new)
        return True

    def walk(prefix: str, parent: nn.Module) -> None:
        if id(parent) in visited:
            return
        visited.add(id(parent))
        # _modules, not named_children(): that one yields a module held under two names only once
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            if consider(path, child):
                slots.append((parent, name, id(child)))
            else:
                walk(path, child)

    root_swapped = consider("", model)
    if not root_swapped:
        walk("", model)
    if skipped:
        warnings.warn("fusedrnn: left unconverted (a subclass of a recurrent class; convert_subclasses=True "
                      "swaps it, dropping its own forward): " + ", ".join(skipped), stacklevel=3)
    for parent, name, key in slots:
        parent._modules[name] = plan[key][1]
    for old, new in plan.values():
        _carry_state(old, new)
    return plan[id(model)][1] if root_swapped else model


def _build(target: type, kwargs: dict, old: nn.Module, path: str) -> Optional[nn.Module]:
    """The new module holding `old`'s own Parameter objects; None if old's parameters don't fit."""
    with warnings.catch_warnings():
        # e.g. dropout with num_layers=1: the original's construction warned already
        warnings.simplefilter("ignore")
        new = target(**kwargs, device="meta")  # meta: no memory, no init; every parameter is replaced below
    old_params = dict(old.named_parameters(recurse=False))
    new_names = [name for name, p in new._parameters.items() if p is not None]
    if sorted(old_params) != sorted(new_names):  # e.g. weight_norm's weight_g / weight_v
        return None
    for name in new_names:
        setattr(new, name, old_params[name])  # torch.nn.RNNBase's __setattr__ keeps _flat_weights in step
    if isinstance(new, nn.RNNBase):
        new._init_flat_weights()  # weak refs to the new weights; on cuDNN, one contiguous weight buffer
    return new


def _carry_state(old: nn.Module, new: nn.Module) -> None:
    new.train(old.training)
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr, None)
        if hooks is None or not hasattr(new, attr):
            continue
        if getattr(new, attr):  # the class registered hooks of its own: keep them, add the user's
            getattr(new, attr).update(hooks)
        else:
            setattr(new, attr, hooks)
    if hasattr(old, "_is_full_backward_hook"):
        new._is_full_backward_hook = old._is_full_backward_hook


# -- dynamic quantization -----------------------------------------------------------------------------------
def quantize_dynamic(model: nn.Module, qconfig_spec=None, dtype=torch.qint8, mapping=None,
                     inplace: bool = False) -> nn.Module:
    """torch.ao.quantization.quantize_dynamic for a model with fusedrnn modules: to_torch, then torch's.

    torch's own quantize_dynamic does not know fusedrnn's classes: on a fusedrnn model it leaves every
    fusedrnn module in float without a word (even with qconfig_spec={fusedrnn.LSTM}). This returns a torch
    model whose LSTMs / GRUs / cells are torch.ao.nn.quantized.dynamic modules (int8 weights, on the CPU);
    torch has no dynamic quantized RNN (Elman), so those stay float torch.nn.RNN. qconfig_spec, dtype and
    mapping are torch's; fusedrnn classes in qconfig_spec stand for their torch.nn counterparts. The model is
    copied first unless inplace=True. See to_torch for what cannot be converted (merge_mode, lengths=).
    """
    import copy

    from torch.ao.quantization import quantize_dynamic as torch_quantize_dynamic

    if not inplace:
        model = copy.deepcopy(model)
    model = to_torch(model)
    if isinstance(qconfig_spec, dict):
        qconfig_spec = {FUSED_TO_TORCH.get(key, key) if isinstance(key, type) else key: value
                        for key, value in qconfig_spec.items()}
    elif qconfig_spec is not None:
        qconfig_spec = {FUSED_TO_TORCH.get(key, key) if isinstance(key, type) else key for key in qconfig_spec}
    return torch_quantize_dynamic(model, qconfig_spec, dtype=dtype, mapping=mapping, inplace=True)
