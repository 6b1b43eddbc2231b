"""fusedrnn: drop-in torch.nn.LSTM / GRU / RNN on fused CUDA, Triton and C++ kernels.

    import fusedrnn
    lstm = fusedrnn.LSTM(256, 512, num_layers=2, batch_first=True)   # same arguments as torch.nn.LSTM
    fusedrnn.available_backends("cpu")       # ['reference', ...] -- what can run here
    with fusedrnn.use_backend("reference"):  # or FUSEDRNN_BACKEND=reference; default "auto"
        y, (h, c) = lstm(x)
    print(fusedrnn.explain(lstm, x))         # which backend each layer used, and why others were skipped
    model = fusedrnn.convert(model)          # torch.nn RNNs inside a model -> fusedrnn (fusedrnn.to_torch: back)
"""
from . import functional, ops, reference  # noqa: F401  (ops registers the torch.library ops)
from ._extension import extension_error, has_extension  # noqa: F401
from .backends import (BACKEND_NAMES, BackendUnsupportedError, available_backends, current_backend,  # noqa: F401
                       explain, use_backend)
from .nn import (GRU, LSTM, RNN, GRUCell, LayerNormGRU, LayerNormGRUCell, LayerNormLSTM, LayerNormLSTMCell,  # noqa: F401
                 LSTMCell, RNNCell, is_recurrent, pack_padded_sequence, pad_packed_sequence, symbolic_trace)
from .decoding import beam_search, greedy_search, sample  # noqa: F401
from .interop import convert, quantize_dynamic, to_torch  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell",
    "LayerNormLSTM", "LayerNormGRU", "LayerNormLSTMCell", "LayerNormGRUCell",
    "available_backends", "use_backend", "current_backend", "explain", "BackendUnsupportedError",
    "BACKEND_NAMES", "has_extension", "functional", "ops", "reference",
    "beam_search", "greedy_search", "sample", "is_recurrent", "symbolic_trace", "convert", "to_torch",
    "quantize_dynamic", "pack_padded_sequence", "pad_packed_sequence",
]
