"""Triton kernels of fusedrnn (kernel + launcher in each file); the "triton" backend is fusedrnn/backends/triton.py."""
