"""Modules: the 4-bit linear layers (NF4/FP4, GPTQ) and the LoRA wrapper (and, later, int8/AWQ)."""

from .gptq_linear import GPTQLinear
from .linear4bit import Linear4bit

__all__ = ["GPTQLinear", "Linear4bit"]
