"""The quantization math in plain torch: the reference every fast path is tested against."""

from .dtypes import FP4, INT4, NF4, QUANT_TYPES, dynamic_map, get_code
from .four_bit import dequantize_4bit_reference, quantize_4bit
from .state import QuantState

__all__ = ["FP4", "INT4", "NF4", "QUANT_TYPES", "QuantState", "dequantize_4bit_reference", "dynamic_map", "get_code",
           "quantize_4bit"]
