"""Fast paths, one file per op; each op's reference implementation lives in fourbit.quant."""

from .dequantize import dequantize_4bit
from .matmul_4bit import matmul_4bit

__all__ = ["dequantize_4bit", "matmul_4bit"]
