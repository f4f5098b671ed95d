"""RMS normalization as Llama-family models compute it:

    y = w * cast(x / sqrt(mean(x^2) + eps))      (the mean, the root and the division in float32;
                                                   cast back to x's dtype, then times w)

transformers' LlamaRMSNorm (and Mistral's, Qwen2's, Qwen3's) rounds twice in a 16-bit dtype:
once casting the normalized row back, once in the product with the weight; both forms here keep
both. On a CPU the native kernel (kernels/cpu/decode.c) does it in one call; elsewhere, and as
its reference, the plain-torch form in transformers' order of operations. In training, with the
weight frozen (LoRA), one autograd node runs the native forward and the native gradient for x:

    dL/dx = cast(r gh - x r^3 mean(gh x)),   gh = float32(cast(dL/dy * w)),  r = 1 / sqrt(mean(x^2) + eps)

two calls where autograd runs about eighteen ops of the reference forward and backward.
"""

from __future__ import annotations

import torch

from .cpu import native


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        ctx.eps = eps
        ctx.save_for_backward(x, weight)
        return native.rms_norm(x, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return native.rms_norm_backward(x, weight, grad, ctx.eps), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The norm of x's last dimension: the native kernels on a CPU (in training where the weight
    is frozen), else the reference."""
    if native.supports_decode(x, weight):
        if not torch.is_grad_enabled():
            return native.rms_norm(x, weight, eps)
        if not weight.requires_grad:
            return _RMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
