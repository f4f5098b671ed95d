"""AutoAWQ's GEMM checkpoint layout: AWQLinear.

Per layer P: P.qweight, P.qzeros, P.scales, P.bias (quant/awq_layout.py packs and unpacks them, in the
GEMM layout's interleaved order). config.json: ``quant_method: awq, bits: 4, group_size,
zero_point: true, version: gemm``. The other AWQ versions (GEMV, gemv_fast, llm-awq) interleave
their words differently and are refused by name.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..nn.awq_linear import AWQLinear
from ..quant.awq_layout import BITS
from .base import Format


class Awq(Format):
    name = "awq"
    layer_type = AWQLinear
    marker = "qweight"

    def detect(self, qconfig: dict) -> dict | None:
        if qconfig.get("quant_method") != "awq":
            return None
        version = str(qconfig.get("version", "gemm")).lower()
        if version != "gemm":
            raise InputError(f"AWQ version {version!r} is not supported; fourbit reads the 'gemm' layout (GEMV, "
                             "gemv_fast and llm-awq interleave their words differently)")
        bits = int(qconfig.get("bits", qconfig.get("w_bit", 4)))
        if bits != BITS:
            raise InputError(f"{bits}-bit AWQ checkpoints are not supported; the GEMM layout holds 4-bit codes")
        if not qconfig.get("zero_point", True):
            raise InputError("AWQ checkpoints without zero points (zero_point: false) are not supported")
        return {"group_size": int(qconfig.get("group_size", qconfig.get("q_group_size", 128)))}

    def layer(self, linear: nn.Module, settings: dict, compute_dtype: torch.dtype) -> AWQLinear:
        return AWQLinear(linear.in_features, linear.out_features, BITS, settings["group_size"], linear.bias is not None,
                         compute_dtype, device="meta")

    def quantization_config(self, group_size: int = 128) -> dict:
        """As AutoAWQ and transformers write it."""
        return {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": BITS, "version": "gemm",
                "modules_to_not_convert": None}


AWQ = Awq()
