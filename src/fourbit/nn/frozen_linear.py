"""FrozenLinear: what every quantized linear layer shares (Linear4bit, Linear8bit, GPTQLinear,
AWQLinear), and the one autograd function their products go through.

    y = x @ W^T + b,       W = the layer's stored weight, dequantized (``dequantize(dtype)``)

A layer stores its weight in its format's tensors (``stored()``: packed codes, scales...) and
says how to multiply with them (``product``: a fused 4-bit kernel, LLM.int8()'s integer
product, or dequantize-and-matmul) and how to rebuild the dense weight from them
(``weight_from``). The weight is frozen, so backward needs only

    dL/dx = dL/dy @ W           and dL/db = sum of dL/dy over tokens, when a bias trains

for which the weight is dequantized again from the stored tensors the forward saved (``grad_product``;
a layer may multiply without a dense copy, as Linear4bit does on a CPU in float32): the autograd
graph holds the quantized tensors, never a dense copy (the QLoRA memory saving).

Dtype casts of a model (``.to(bfloat16)``, ``.half()``) move these layers but leave the tensors
named in ``stored_dtypes`` as the format stores them (integer codes are never cast anyway; float
scales are rounded through the new dtype otherwise), restoring them from their values before the
cast.
"""

from __future__ import annotations

import torch
from torch import nn


class _FrozenProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: FrozenLinear, *stored: torch.Tensor):
        ctx.layer, ctx.has_bias, ctx.n_stored = layer, bias is not None, len(stored)
        ctx.save_for_backward(*stored)
        return layer.product(x, bias, stored)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        stored = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.layer.grad_product(grad_out, stored)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return (grad_x, grad_bias, None) + (None,) * ctx.n_stored


def frozen_product(layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T + bias`` through ``layer``'s stored weight: one autograd node when a gradient is
    wanted, the plain product (no node) in inference. ``layer``: a FrozenLinear, or anything with
    its ``stored``, ``product``, ``grad_product`` and ``weight_from`` (one 4-bit expert matrix,
    nn/experts4bit.py)."""
    stored = layer.stored()
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _FrozenProduct.apply(x, bias, layer, *stored)
    return layer.product(x, bias, stored)


class FrozenLinear(nn.Module):
    """Subclasses set ``in_features``, ``out_features`` (and ``compute_dtype`` where they use one)
    and define ``stored``, ``product`` and ``weight_from``; ``stored_dtypes`` names their float
    tensors that dtype casts must leave as stored."""

    in_features: int
    out_features: int
    stored_dtypes: tuple[str, ...] = ()

    def stored(self) -> tuple[torch.Tensor, ...]:
        """The tensors the weight is stored in (what backward keeps)."""
        raise NotImplementedError

    def product(self, x: torch.Tensor, bias: torch.Tensor | None, stored: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``x @ W^T + bias`` from the stored tensors."""
        return nn.functional.linear(x, self.weight_from(stored, x.dtype), bias)

    def grad_product(self, grad: torch.Tensor, stored: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``grad @ W`` (dL/dx) from the stored tensors, in grad's dtype."""
        return grad @ self.weight_from(stored, grad.dtype)

    def weight_from(self, stored: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """The dense weight [out, in] in ``dtype``, from the stored tensors."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out, in] this layer represents."""
        return self.weight_from(self.stored(), dtype or getattr(self, "compute_dtype", None) or torch.float32)

    def _apply(self, fn, recurse=True):
        kept = {name: t for name in self.stored_dtypes if (t := getattr(self, name, None)) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != before.dtype and not after.is_meta:
                restored = before.to(after.device)
                if name in self._parameters:
                    self._parameters[name] = nn.Parameter(restored, requires_grad=after.requires_grad)
                else:
                    self._buffers[name] = restored
        return self
