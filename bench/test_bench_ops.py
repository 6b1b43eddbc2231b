"""pytest-benchmark suite for the fusedrnn layer op: every available backend next to torch.nn.

    pip install pytest-benchmark            # or the "bench" extra
    pytest bench/test_bench_ops.py --benchmark-only                        # all cases on this device
    pytest bench/test_bench_ops.py --benchmark-only -k "lstm and fwdbwd"   # a subset
    pytest bench/test_bench_ops.py --benchmark-only --benchmark-json=ops.json --benchmark-group-by=group

One benchmark per (cell, shape, dtype, mode, provider); the providers of one configuration share a group, so
pytest-benchmark's table compares them directly. The op is timed as users call it: a fusedrnn provider is
`fusedrnn.functional.rnn_layer` (one layer, one direction) on its forced backend, torch.nn is a one-layer
torch.nn module with the same weights. Before timing, the provider's outputs (and gradients in fwdbwd) are
checked against torch.nn with fusedrnn.bench's rule; a wrong provider fails here instead of being timed.
On a GPU each timed call ends with torch.cuda.synchronize(), so the wall-clock timer sees the device work.
This suite measures; correctness is the business of tests/.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("pytest_benchmark")

import fusedrnn  # noqa: E402
from fusedrnn import functional  # noqa: E402
from fusedrnn.bench import check  # noqa: E402
from fusedrnn.bench.presets import Case, Shape, case_flops  # noqa: E402
from fusedrnn.bench.providers import auto_backends, forced_backend, make_torch_module  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    SHAPES = [Shape(100, 16, 512, 512), Shape(100, 64, 1024, 1024)]
    DTYPES = ["float16", "float32"]
else:  # a few seconds each on a small CPU
    SHAPES = [Shape(32, 8, 128, 128), Shape(32, 32, 256, 256)]
    DTYPES = ["float32"]
CELLS = ["lstm", "gru", "rnn_tanh"]
MODES = ["fwd", "fwdbwd"]
PROVIDERS = ["torch"] + [f"fusedrnn:{b}" for b in auto_backends(DEVICE)]


class LayerOp(nn.Module):
    """One layer, one direction of `module` as a direct call of the fusedrnn op, with the module's calling
    convention (x, hx) -> (y, h_n [1, B, H]) or (y, (h_n, c_n)); holds its own copy of the weights."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.cell = "lstm" if isinstance(module, nn.LSTM) else "gru" if isinstance(module, nn.GRU) else \
            f"rnn_{module.nonlinearity}"
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            self.register_parameter(name, nn.Parameter(getattr(module, name).detach().clone()))

    def forward(self, x, hx):
        h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
        y, h, c = functional.rnn_layer(self.cell, x, h0[0], None if c0 is None else c0[0], self.weight_ih_l0,
                                       self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0)
        return y, ((h[None], c[None]) if c is not None else h[None])


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_layer_op(benchmark, cell, shape, dtype, mode, provider):
    case = Case(cell, shape, dtype, mode)
    module = make_torch_module(case, DEVICE, case.torch_dtype)
    inputs = check.make_inputs(case, DEVICE)
    backend = provider.split(":", 1)[1] if provider != "torch" else None
    fn = module if backend is None else LayerOp(module)
    context = (lambda: forced_backend(backend)) if backend else (lambda: fusedrnn.use_backend("auto"))

    # the provider must compute torch.nn's function before its time means anything
    if backend is not None:
        ref_module = check.reference_module(module)
        ref_inputs = inputs.to(torch.float64)
        ref64 = check.collect(ref_module, ref_inputs, check.make_step(ref_module, ref_inputs, mode)(), mode)
        baseline = check.collect(module, inputs, check.make_step(module, inputs, mode)(), mode)
        try:
            with context():
                got = check.collect(fn, inputs, check.make_step(fn, inputs, mode)(), mode)
        except fusedrnn.BackendUnsupportedError as e:
            pytest.skip(str(e))
        verdict = check.judge(got, baseline, ref64, case.torch_dtype)
        assert verdict.ok, f"{provider} is WRONG on {case.id}: {verdict.detail}"

    step = check.make_step(fn, inputs, mode)

    def timed():
        with context():
            step()
            _sync()

    benchmark.group = case.id
    benchmark.extra_info.update(case.fields())
    benchmark.extra_info.update(provider=provider, flops=case_flops(case), device=str(DEVICE),
                                torch_version=torch.__version__)
    benchmark.pedantic(timed, warmup_rounds=2, rounds=10 if DEVICE.type == "cpu" else 30, iterations=1)
