"""Kernels: one file per backend implementation (torch here; Triton and CUDA beside it)."""
