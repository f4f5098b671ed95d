"""bitsandbytes' 8-bit format (LLM.int8()): Linear8bit layers.

Per layer P: P.weight (int8 [out, in], the row-wise codes), P.SCB (float32 [out], each row's
absmax), P.weight_format (uint8 0: the row layout), P.bias. config.json: ``quant_method:
bitsandbytes, load_in_8bit: true, llm_int8_threshold``. nn/linear8bit.py computes with them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.linear8bit import Linear8bit
from ..quant.int8 import DEFAULT_THRESHOLD
from .base import Format
from .bnb4bit import BNB_4BIT


class Int8(Format):
    name = "int8"
    layer_type = Linear8bit
    marker = "SCB"

    def detect(self, qconfig: dict) -> dict | None:
        if qconfig.get("quant_method") != "bitsandbytes" or not qconfig.get("load_in_8bit", qconfig.get("_load_in_8bit")):
            return None
        return {"threshold": float(qconfig.get("llm_int8_threshold", DEFAULT_THRESHOLD))}

    def layer(self, linear: nn.Module, settings: dict, compute_dtype: torch.dtype) -> Linear8bit:
        return Linear8bit(linear.in_features, linear.out_features, linear.bias is not None, settings["threshold"],
                          device="meta")

    def quantization_config(self, threshold: float = DEFAULT_THRESHOLD) -> dict:
        """As transformers' BitsAndBytesConfig(load_in_8bit=True) writes it."""
        return BNB_4BIT.quantization_config("nf4", False, torch.float32) | {
            "load_in_4bit": False, "_load_in_4bit": False, "load_in_8bit": True, "_load_in_8bit": True,
            "llm_int8_threshold": threshold,
        }


INT8 = Int8()
