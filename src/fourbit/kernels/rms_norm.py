"""RMS normalization as Llama-family models compute it:

    y = w * cast(x / sqrt(mean(x^2) + eps))      (the mean, the root and the division in float32;
                                                   cast back to x's dtype, then times w)

transformers' LlamaRMSNorm (and Mistral's, Qwen2's, Qwen3's) rounds twice in a 16-bit dtype:
once casting the normalized row back, once in the product with the weight; both forms here keep
both. On a CPU the native kernel (kernels/cpu/decode.c) does it in one call; elsewhere, and as
its reference, the plain-torch form in transformers' order of operations.
"""

from __future__ import annotations

import torch

from .cpu import native


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The norm of x's last dimension (no gradient through the native kernel: decoding only)."""
    if not torch.is_grad_enabled() and native.supports_decode(x, weight):
        return native.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
