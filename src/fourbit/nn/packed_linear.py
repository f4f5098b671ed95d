"""PackedLinear: what the frozen linears stored as a checkpoint's packed integer words share
(GPTQLinear in GPTQ's v1 layout, AWQLinear in AWQ's GEMM layout).

    y = x @ W^T + b,    W = dequantize(the stored words, zero points and float16 scales)

A subclass registers the checkpoint's tensors as buffers under their stored names (so
``state_dict()`` is the layer's part of the folder) and says how to rebuild W: ``dequantize``.
The forward dequantizes W in the compute dtype and multiplies (the torch path, on every device; a
fused GPU kernel is issue 6's business). As a LoRA base it behaves as Linear4bit does: backward
needs only dL/dx = g @ W, for which it dequantizes again rather than keeping W between forward
and backward. Dtype casts of the model leave the stored tensors as the formats store them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..quant.groupwise import GroupQuant


class _FrozenLinear(torch.autograd.Function):
    """x @ weight(dtype)^T + b for a frozen weight rebuilt by ``weight`` when needed."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, weight(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_out @ ctx.weight(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


class PackedLinear(nn.Module):
    """Subclasses take ``(in_features, out_features, bits, group_size, bias, compute_dtype, device)``,
    register the buffers (with ``scales`` and ``bias``), name their format's ``pack`` (GroupQuant
    -> the stored tensors) and define ``dequantize(dtype) -> [out, in]``."""

    in_features: int
    out_features: int
    bits: int
    group_size: int
    compute_dtype: torch.dtype | None
    pack: Callable[[GroupQuant], dict[str, torch.Tensor]]

    @classmethod
    def from_quant(cls, quant: GroupQuant, bias: torch.Tensor | None = None, group_size: int = 128,
                   compute_dtype: torch.dtype | None = None):
        """The layer storing ``quant`` (codes [out, in]) and ``bias``, on the codes' device."""
        out_features, in_features = quant.codes.shape
        layer = cls(in_features, out_features, quant.bits, group_size, bias is not None, compute_dtype)
        for name, tensor in cls.pack(quant).items():
            getattr(layer, name).copy_(tensor)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer.to(quant.codes.device)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = self.bias.to(dtype) if self.bias is not None else None
        return _FrozenLinear.apply(x.to(dtype), self.dequantize, bias).to(x.dtype)

    def _apply(self, fn, recurse=True):
        # .to(device) moves the buffers; a dtype cast (model.half(), .to(bfloat16)) must not change
        # them: the integer words are not floats, and the formats store scales and bias in float16.
        # Cast back from the values before the cast, not from the cast ones: a round trip through
        # bfloat16 would round them.
        before = {name: self._buffers[name] for name in ("scales", "bias") if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, tensor in before.items():
            after = self._buffers[name]
            if after.dtype != tensor.dtype and not after.is_meta:
                self._buffers[name] = tensor.to(after.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
