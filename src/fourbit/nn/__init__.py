"""Modules: the quantized linear layers (NF4/FP4, GPTQ, AWQ, LLM.int8()) and the LoRA layer."""

from .awq_linear import AWQLinear
from .dense_linear import DenseLinear
from .frozen_linear import FrozenLinear
from .gptq_linear import GPTQLinear
from .linear4bit import Linear4bit
from .linear8bit import Linear8bit

__all__ = ["AWQLinear", "DenseLinear", "FrozenLinear", "GPTQLinear", "Linear4bit", "Linear8bit"]
