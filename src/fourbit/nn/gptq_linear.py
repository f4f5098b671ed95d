"""GPTQLinear: a frozen linear layer stored in GPTQ's v1 checkpoint layout (io/gptq.py).

    y = x @ W^T + b,    W[o, i] = scales[g_idx[i], o] * (code[o, i] - zero[g_idx[i], o])

The buffers are the checkpoint's tensors as they are stored (``qweight``, ``qzeros``,
``scales``, ``g_idx``, ``bias``), so ``state_dict()`` is the layer's part of a GPTQ folder and
``load_state_dict`` reads one. The forward dequantizes W in the compute dtype and multiplies
(the torch path, on every device; a fused GPU kernel is issue 6's business). As a LoRA base it
behaves as Linear4bit does: backward needs only dL/dx = g @ W, for which it dequantizes again
rather than keeping W between forward and backward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..io.gptq import pack_gptq, unpack_gptq
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


class GPTQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128, bias: bool = False,
                 compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size
        self.compute_dtype = compute_dtype
        per_word = 32 // bits
        groups = 1 if group_size == -1 else in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features // per_word, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // per_word, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)

    @classmethod
    def from_quant(cls, quant: GroupQuant, bias: torch.Tensor | None = None, group_size: int = 128,
                   compute_dtype: torch.dtype | None = None) -> GPTQLinear:
        out_features, in_features = quant.codes.shape
        layer = cls(in_features, out_features, quant.bits, group_size, bias is not None, compute_dtype)
        for name, tensor in pack_gptq(quant).items():
            getattr(layer, name).copy_(tensor)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer.to(quant.codes.device)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out, in] these codes represent."""
        tensors = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}
        return unpack_gptq(tensors, self.bits).dequantize(dtype or self.compute_dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = self.bias.to(dtype) if self.bias is not None else None
        return _FrozenLinear.apply(x.to(dtype), self.dequantize, bias).to(x.dtype)

    def _apply(self, fn, recurse=True):
        # .to(device) moves the buffers; a dtype cast (model.half(), .to(bfloat16)) must not change
        # them: the integer words are not floats, and the format stores scales and bias in float16.
        super()._apply(fn, recurse)
        for name in ("scales", "bias"):
            tensor = self._buffers.get(name)
            if tensor is not None and tensor.dtype != torch.float16 and not tensor.is_meta:
                self._buffers[name] = tensor.half()
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
