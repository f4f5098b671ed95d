"""Triton kernels behind the ops in fourbit.kernels.

Imported only when a CUDA tensor reaches an op (or by the tests), never at ``import fourbit``:
Triton is a GPU-only dependency, and ``TRITON_INTERPRET=1`` (the CPU interpreter the tests use
when no GPU is present) must be set before these modules are first imported.
"""
