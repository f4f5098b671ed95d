"""fourbit: QLoRA on hardware people can afford.

    model, tokenizer = fourbit.load_model("path/or/hub-id", quantization="nf4")
    model = fourbit.add_lora(model, r=16, alpha=32, target="all-linear")
    fourbit.train(model, tokenizer, fourbit.load_config("train.yaml"))
"""

from .io.checkpoint import save_quantized
from .io.hf_quantizer import FourbitConfig, NF4Config
from .io.loader import load_model
from .io.peft import load_adapter, save_adapter
from .kernels.dequantize import dequantize_4bit
from .nn.linear4bit import Linear4bit
from .nn.lora import add_lora
from .quant import QuantState, quantize_4bit
from .train.config import TrainConfig, load_config
from .train.recipe import train

__version__ = "0.1.0"
__all__ = [
    "FourbitConfig", "Linear4bit", "NF4Config", "QuantState", "TrainConfig", "add_lora", "dequantize_4bit", "load_adapter",
    "load_config", "load_model", "quantize_4bit", "save_adapter", "save_quantized", "train",
]
