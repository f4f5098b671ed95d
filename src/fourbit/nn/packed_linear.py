"""PackedLinear: what the frozen linears stored as a checkpoint's packed integer words share
(GPTQLinear in GPTQ's v1 layout, AWQLinear in AWQ's GEMM layout).

    y = x @ W^T + b,    W = dequantize(the stored words, zero points and float16 scales)

A subclass registers the checkpoint's tensors as buffers under their stored names (so
``state_dict()`` is the layer's part of the folder) and says how to rebuild W: ``dequantize``.
The forward dequantizes W in the compute dtype and multiplies (the torch path, on every device).
Backward and dtype casts are FrozenLinear's (nn/frozen_linear.py): dL/dx dequantizes again
rather than keeping W, and casts of the model leave the stored tensors as the formats store them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..quant.groupwise import GroupQuant
from .frozen_linear import FrozenLinear, frozen_product


class PackedLinear(FrozenLinear):
    """Subclasses take ``(in_features, out_features, bits, group_size, bias, compute_dtype, device)``,
    register the buffers (with ``scales`` and ``bias``), list the ones the codes live in
    (``stored_names``) and name their format's ``pack`` (GroupQuant -> the stored tensors) and
    ``unpack`` (the stored tensors -> GroupQuant)."""

    in_features: int
    out_features: int
    bits: int
    group_size: int
    compute_dtype: torch.dtype | None
    pack: Callable[[GroupQuant], dict[str, torch.Tensor]]
    unpack: Callable[[dict[str, torch.Tensor]], GroupQuant]

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

    stored_dtypes = ("scales", "bias")  # float16, as the formats store them: a model cast must not round them
    stored_names: tuple[str, ...]  # the buffers the weight is stored in, in the order weight_from reads them

    def stored(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.stored_names)

    def weight_from(self, stored, dtype):
        return self.unpack(dict(zip(self.stored_names, stored))).dequantize(dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out, in] these codes represent."""
        return self.weight_from(self.stored(), dtype or self.compute_dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = self.bias.to(dtype) if self.bias is not None else None
        return frozen_product(self, x.to(dtype), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
