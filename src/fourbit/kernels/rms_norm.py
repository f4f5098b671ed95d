"""RMS normalization as Llama-family models compute it:

    y = w * cast(x / sqrt(mean(x^2) + eps))      (the mean, the root and the division in float32;
                                                   cast back to x's dtype, then times w)

transformers' LlamaRMSNorm (and Mistral's, Qwen2's, Qwen3's) rounds twice in a 16-bit dtype:
once casting the normalized row back, once in the product with the weight; this keeps both.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The plain-torch form (transformers' own order of operations)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_reference(x, weight, eps)
