"""Backend "triton": the Triton kernels of fusedrnn/triton."""
from __future__ import annotations

from .base import Backend


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, device):
        return "the Triton kernels are not written yet (issue: Triton kernels)"
