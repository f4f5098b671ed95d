"""GPTQ's v1 checkpoint layout (AutoGPTQ's; GPTQModel and transformers read it): GPTQLinear.

Per layer P: P.qweight, P.qzeros, P.scales, P.g_idx, P.bias (quant/gptq_layout.py packs and unpacks
them). config.json: ``quant_method: gptq, bits, group_size, desc_act, sym, checkpoint_format:
gptq``. Round-to-nearest folders are the same layout; their config says so (``method: rtn``,
no damping), since nothing about them was calibrated.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..nn.gptq_linear import GPTQLinear
from ..quant.gptq_layout import PACKABLE_BITS
from .base import Format


class Gptq(Format):
    name = "gptq"
    layer_type = GPTQLinear
    marker = "qweight"

    def detect(self, qconfig: dict) -> dict | None:
        if qconfig.get("quant_method") != "gptq":
            return None
        layout = qconfig.get("checkpoint_format", qconfig.get("format", "gptq"))
        if layout != "gptq":
            raise InputError(f"GPTQ checkpoint_format {layout!r} is not supported; fourbit reads the 'gptq' (v1) layout")
        bits, group_size = int(qconfig.get("bits", 4)), int(qconfig.get("group_size", -1))
        if bits not in PACKABLE_BITS:
            raise InputError(f"{bits}-bit GPTQ checkpoints are not supported; fourbit reads {PACKABLE_BITS}-bit ones")
        return {"bits": bits, "group_size": group_size}

    def layer(self, linear: nn.Module, settings: dict, compute_dtype: torch.dtype) -> GPTQLinear:
        return GPTQLinear(linear.in_features, linear.out_features, settings["bits"], settings["group_size"],
                          linear.bias is not None, compute_dtype, device="meta")

    def quantization_config(self, bits: int = 4, group_size: int = 128, sym: bool = True, act_order: bool = False,
                            damp: float | None = 0.01) -> dict:
        """As transformers' GPTQConfig and AutoGPTQ's quantize_config.json name the settings (within-layer
        order: not true-sequential). ``damp=None``: round-to-nearest, which its config says."""
        config = {
            "quant_method": "gptq", "bits": bits, "group_size": group_size, "damp_percent": damp, "desc_act": act_order,
            "sym": sym, "true_sequential": False, "static_groups": False, "checkpoint_format": "gptq", "format": "gptq",
        }
        if damp is None:  # nothing was calibrated: say it is round-to-nearest
            del config["damp_percent"]
            config["method"] = "rtn"
        return config


GPTQ = Gptq()
