"""fourbit: QLoRA on hardware people can afford.

    model, tokenizer = fourbit.load_model("path/or/hub-id", quantization="nf4")
"""

from .io.checkpoint import save_quantized
from .io.loader import load_model
from .kernels.dequantize import dequantize_4bit
from .nn.linear4bit import Linear4bit
from .quant import QuantState, quantize_4bit

__version__ = "0.1.0"
__all__ = ["Linear4bit", "QuantState", "dequantize_4bit", "load_model", "quantize_4bit", "save_quantized"]
