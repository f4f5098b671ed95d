"""bitsandbytes' 4-bit format (NF4, FP4; and fourbit's INT4 table): Linear4bit layers.

Per quantized weight P of n values in blocks of B, a checkpoint holds P.weight (uint8, two codes
a byte, [ceil(n/2), 1]), P.weight.absmax, P.weight.quant_map, with double quantization
P.weight.nested_absmax and P.weight.nested_quant_map, and P.weight.quant_state.bitsandbytes__<type>
(a JSON blob of the rest); nn/linear4bit.py and quant/state.py read and write them. config.json:
``quant_method: bitsandbytes, load_in_4bit: true, bnb_4bit_quant_type, bnb_4bit_use_double_quant``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.linear4bit import Linear4bit
from ..quant.dtypes import check_quant_type
from .base import Format

QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__"


class Bnb4bit(Format):
    name = "bnb-4bit"
    layer_type = Linear4bit
    marker = QUANT_STATE_KEY

    def detect(self, qconfig: dict) -> dict | None:
        if qconfig.get("quant_method") != "bitsandbytes" or not qconfig.get("load_in_4bit", qconfig.get("_load_in_4bit")):
            return None
        quant_type = qconfig.get("bnb_4bit_quant_type", "fp4")
        check_quant_type(quant_type)
        return {"quant_type": quant_type, "double_quant": bool(qconfig.get("bnb_4bit_use_double_quant", False))}

    def layer(self, linear: nn.Module, settings: dict, compute_dtype: torch.dtype) -> Linear4bit:
        return Linear4bit(linear.in_features, linear.out_features, linear.bias is not None, settings["quant_type"],
                          settings.get("blocksize", 64), settings["double_quant"], compute_dtype, device="meta")

    def quantization_config(self, quant_type: str = "nf4", double_quant: bool = True,
                            compute_dtype: torch.dtype = torch.float32) -> dict:
        """As transformers' BitsAndBytesConfig writes it."""
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "bnb_4bit_quant_type": quant_type,
            "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": None,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
        }


BNB_4BIT = Bnb4bit()
