"""Backend "cpu": the C++ layer kernels of csrc/cpu (registered as fusedrnn::cpu_rnn_layer_*)."""
from __future__ import annotations

from .base import Backend


class CpuBackend(Backend):
    name = "cpu"

    def unavailable_reason(self, device):
        if device.type != "cpu":
            return f"runs on CPU tensors only, got {device.type}"
        return "the C++ CPU kernels are not built yet (issue: CPU fallback in C++)"
