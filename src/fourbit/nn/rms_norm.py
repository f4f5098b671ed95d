"""RMSNorm as a fourbit module: transformers' Llama-family norm (Llama, Mistral, Qwen2, Qwen3), the
same function and parameter, computed by kernels/rms_norm.py (on a CPU, native kernels for the
forward and, with the weight frozen as in LoRA training, for the gradient).

``replace_rms_norms(model)`` swaps it in for those classes' modules, keeping each one's weight
(the same Parameter, so state dicts, adapters and optimizers see no change) and epsilon. Norms of
other formulas (Gemma's ``1 + w``, LayerNorm) are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.rms_norm import rms_norm

NORMS = {"llama": "LlamaRMSNorm", "mistral": "MistralRMSNorm", "qwen2": "Qwen2RMSNorm", "qwen3": "Qwen3RMSNorm"}
REPLACED = tuple(NORMS.values())  # the classes computing y = w * cast(x / rms(x)), per model type


class RMSNorm(nn.Module):
    """``weight * cast(x / sqrt(mean(x^2) + eps))`` over the last dimension, as transformers' LlamaRMSNorm."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def replace_rms_norms(model: nn.Module) -> int:
    """Swap every module of a class in REPLACED for an RMSNorm with its weight and epsilon; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ in REPLACED:
                setattr(parent, name, RMSNorm(child.weight, child.variance_epsilon))
                swapped += 1
    return swapped
