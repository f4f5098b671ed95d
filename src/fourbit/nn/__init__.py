"""Modules: the quantized linear layers (NF4/FP4, GPTQ, LLM.int8()) and the LoRA wrapper."""

from .gptq_linear import GPTQLinear
from .linear4bit import Linear4bit
from .linear8bit import Linear8bit

__all__ = ["GPTQLinear", "Linear4bit", "Linear8bit"]
