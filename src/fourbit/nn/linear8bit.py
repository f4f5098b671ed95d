"""Linear8bit: a frozen linear layer in LLM.int8() form (quant/int8.py), stored as transformers +
bitsandbytes store 8-bit layers (docs/formats.md §3):

    P.weight         int8 [out, in]    CB, the row-wise absmax codes
    P.SCB            float32 [out]     each row's absmax
    P.weight_format  uint8 scalar 0    "row" layout (the only one written or read)

Forward: the int8 product with outlier decomposition at ``threshold`` (default 6.0, as
transformers' llm_int8_threshold). As a LoRA base, backward needs only dL/dx, computed with the
int8-dequantized weight (the activation rounding passes the gradient straight through, as in
bitsandbytes): FrozenLinear's (nn/frozen_linear.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.int8 import (
    DEFAULT_THRESHOLD,
    dequantize_weight_int8,
    int8_matmul,
    quantize_weight_int8,
)
from .frozen_linear import FrozenLinear, frozen_product


def layout_error(weight_format: torch.Tensor) -> str | None:
    """Why a stored ``weight_format`` cannot be read, or None for the row layout (0)."""
    fmt = int(weight_format)
    return None if fmt == 0 else f"weight_format is {fmt}; only the row layout (0) is read"


class Linear8bit(FrozenLinear):
    stored_dtypes = ("SCB",)  # the float32 row scales: a model cast moves them, never rounds them

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = DEFAULT_THRESHOLD,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.threshold = in_features, out_features, threshold
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("SCB", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("weight_format", torch.zeros((), dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = DEFAULT_THRESHOLD) -> Linear8bit:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold,
                    device=linear.weight.device)
        cb, scb = quantize_weight_int8(linear.weight)
        layer.weight.data.copy_(cb)
        layer.SCB.copy_(scb)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def stored(self) -> tuple[torch.Tensor, ...]:
        return (self.weight, self.SCB)

    def product(self, x, bias, stored):
        return int8_matmul(x, stored[0], stored[1], bias, self.threshold).to(x.dtype)

    def weight_from(self, stored, dtype):
        return dequantize_weight_int8(stored[0], stored[1], dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_product(self, x, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        fmt = state_dict.get(prefix + "weight_format")
        if fmt is not None and layout_error(fmt):
            error_msgs.append(prefix + layout_error(fmt))
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"threshold={self.threshold}")
