"""Loads the compiled extension fusedrnn._C (C++ CPU kernels, CUDA kernels) if it was built.

fusedrnn imports without it: then only the "reference" (and, with triton, the "triton") backends run, and
`extension_error()` says why it is missing and how to build it.
"""
from __future__ import annotations

import importlib
from typing import Optional

BUILD_COMMAND = "pip install --no-build-isolation -e .  (from the fusedrnn source tree, with torch installed)"

_error: Optional[str] = None
try:
    _C = importlib.import_module("fusedrnn._C")
except ImportError as e:  # not built, or built against another torch
    _C = None
    _error = (f"the fusedrnn C++/CUDA extension is not available ({e}); build it with: {BUILD_COMMAND}")


def has_extension() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(getattr(_C, "WITH_CUDA", False))


def extension_error() -> Optional[str]:
    """None when the extension loaded, else why not and the command that builds it."""
    return _error
