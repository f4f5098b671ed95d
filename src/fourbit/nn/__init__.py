"""Modules: the 4-bit linear layer (and, later, the int8/GPTQ/AWQ linears and LoRA)."""

from .linear4bit import Linear4bit

__all__ = ["Linear4bit"]
