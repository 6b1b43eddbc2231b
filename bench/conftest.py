"""pytest configuration for the benchmark suites under bench/ (never collected by `pytest tests`)."""
import os
import sys

import torch

# Triton without a GPU means its interpreter, as in tests/conftest.py; set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the source tree, also before it is pip-installed
    sys.path.insert(0, ROOT)
