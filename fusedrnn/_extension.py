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


# The emulated CUDA backend (csrc/emu: the CUDA kernels built as host C++), a module of its own so that a build
# without it loses nothing else. FUSEDRNN_EMU_LIBRARY=path loads another build of it instead (tests/emu/mutate.py).
_C_emu = None
_emu_error: Optional[str] = None
try:
    import os as _os
    _emu_library = _os.environ.get("FUSEDRNN_EMU_LIBRARY")
    if _emu_library:
        import torch as _torch
        _torch.ops.load_library(_emu_library)
        _C_emu = _emu_library
    else:
        _C_emu = importlib.import_module("fusedrnn._C_emu")
except (ImportError, OSError) as e:
    _emu_error = (f"the emulated CUDA extension fusedrnn._C_emu is not available ({e}); it builds on Linux with the "
                  f"CUDA headers (FUSEDRNN_BUILD_EMU=1): {BUILD_COMMAND}")


def has_emulated_cuda() -> bool:
    return _C_emu is not None


def emulated_cuda_error() -> Optional[str]:
    """None when fusedrnn._C_emu loaded, else why not."""
    return _emu_error


def has_extension() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(getattr(_C, "WITH_CUDA", False))


def extension_error() -> Optional[str]:
    """None when the extension loaded, else why not and the command that builds it."""
    return _error
