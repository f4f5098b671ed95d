"""A QLoRA linear in one autograd node: the frozen 4-bit base and the trainable low-rank update.

    y = base(x) + (s x A^T) B^T        base(x) = x W^T + b, W 4-bit [out, in]; A [r, in], B [out, r]

computed exactly as LoRALinear's modules compute it (the update in the adapter's dtype, then
cast to y's and added; s applied on the rank side, to r values per token instead of out), with
the chain rule written out (g = dL/dy, xa = s x A^T kept from forward):

    g'    = g in the adapter's dtype                                      [tokens, out]
    dL/dB = g'^T xa                                                       [out, r]
    g_xa  = s * (g' B)                          dL/d(x A^T)               [tokens, r]
    dL/dA = g_xa^T x                                                      [r, in]
    dL/dx = g W + g_xa A                        W dequantized again       [tokens, in]
                                                (inside the product: matmul_4bit_grad)

With ``keep_weight`` the forward's dequantized W is kept for dL/dx instead of dequantized again
(not where both products dequantize inside themselves: float32 on a CPU with AVX-512 or AVX2).
Made for non-reentrant gradient checkpointing: it drops what the first forward saves and keeps
what the recomputation saves only until this layer's backward, so one layer's dense weights
live at a time and each weight is dequantized twice a step instead of three times (worth it on
a CPU, where dequantizing is a tenth of a step; bench/RESULTS.md). Without checkpointing it
would keep every dense weight until backward, the memory 4 bits are there to save.

Why one node: as separate modules a QLoRA linear is seven autograd nodes (base, cast, A, B,
scale, cast, add), each a Python call and a kernel launch per pass, and with gradient
checkpointing a step runs each forward twice; on a GPU the host then cannot keep up with the
kernels (bench/RESULTS.md). One node also keeps x in its own dtype for dL/dA where autograd
keeps the adapter-dtype copy (float32: twice a bf16 x), and reuses x A^T from the forward.

On a CPU, with float32 adapters of rank <= 64, the rank-r products go to C
(kernels/cpu/low_rank.c): x A^T and g B read a bf16 x or g in place where the torch path first
copies it to float32, dL/dA and dL/dB likewise, and the update is added into the base's output
(and g_xa A into dL/dx) in one pass, rounded as the torch path rounds it. The torch path below
stays the twin (tests/kernels/test_low_rank.py); torch's float32 GEMMs with r as one dimension
ran far below the machine's rate (bench/bench_low_rank.py).

A dense frozen base (``lora_linear``: an nn.Linear, 16-bit LoRA) takes the same node with its
weight in place of the codes: the same LoRA math, one product ``F.linear`` in the weight's dtype.

What it leaves out: dropout and DoRA (LoRALinear keeps its module path for those), a base that
trains (weight or bias), and any base other than Linear4bit and a plain nn.Linear.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..errors import InputError
from ..quant.state import QuantState
from .cpu import native as cpu_native
from .dequantize import dequantize_4bit
from .matmul_4bit import matmul_4bit, matmul_4bit_grad


class _QLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, state: QuantState | None, bias, lora_a, lora_b, scaling: float, compute_dtype,
                keep_weight: bool):
        weight = None
        if state is None:  # a dense frozen base: packed is its weight
            base = F.linear(x.to(compute_dtype), packed, bias).to(x.dtype)
        elif keep_weight and ctx.needs_input_grad[0] and not _in_place(x, state, compute_dtype):
            weight = dequantize_4bit(packed, state, compute_dtype)
            base = F.linear(x.to(compute_dtype), weight, bias).to(x.dtype)
        else:
            base = matmul_4bit(x.to(compute_dtype), packed, state, bias).to(x.dtype)
        ctx.state, ctx.scaling, ctx.compute_dtype = state, scaling, compute_dtype
        ctx.native = cpu_native.supports_low_rank(x, lora_a, lora_b) and base.is_contiguous()
        if ctx.native:  # the same sums read x in place, the update added into base (low_rank.c)
            xa = cpu_native.low_rank_project(x, lora_a.T, scaling)
            out = cpu_native.low_rank_add_(base, xa, lora_b.T.contiguous())
        else:
            xa = F.linear(x.to(lora_a.dtype), lora_a) * scaling
            out = base + F.linear(xa, lora_b).to(base.dtype)
        ctx.save_for_backward(x, packed, xa, lora_a, lora_b, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, packed, xa, lora_a, lora_b, weight = ctx.saved_tensors
        grad_x = grad_a = grad_b = None
        native = ctx.native and cpu_native.supports_low_rank(grad, lora_a, lora_b)
        if native:
            if ctx.needs_input_grad[5]:
                grad_b = cpu_native.low_rank_grad(xa, grad).T
            g_xa = cpu_native.low_rank_project(grad, lora_b, ctx.scaling)
            if ctx.needs_input_grad[4]:
                grad_a = cpu_native.low_rank_grad(g_xa, x)
        else:
            g = grad.to(lora_a.dtype)
            if ctx.needs_input_grad[5]:
                grad_b = g.reshape(-1, g.shape[-1]).T @ xa.reshape(-1, xa.shape[-1])
            g_xa = (g @ lora_b) * ctx.scaling
            if ctx.needs_input_grad[4]:
                grad_a = g_xa.reshape(-1, g_xa.shape[-1]).T @ x.to(lora_a.dtype).reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[0]:
            g = grad.to(ctx.compute_dtype)
            if weight is not None or ctx.state is None:  # kept from forward, or a dense base
                grad_x = g @ (packed if weight is None else weight)
            else:
                grad_x = matmul_4bit_grad(g, packed, ctx.state)
            grad_x = grad_x.to(x.dtype)
            if native and grad_x.is_contiguous():
                cpu_native.low_rank_add_(grad_x, g_xa, lora_a)
            else:
                grad_x = grad_x + (g_xa @ lora_a).to(x.dtype)
        return grad_x, None, None, None, grad_a, grad_b, None, None, None


def _in_place(x: torch.Tensor, state: QuantState, compute_dtype: torch.dtype) -> bool:
    """Whether both of this weight's products run without a dense W (a CPU in float32, many rows:
    gemm_4bit.c), so a W kept for backward would save nothing."""
    return compute_dtype == torch.float32 and cpu_native.supports_training(
        x, state.blocksize, state.nested.blocksize if state.nested is not None else 0, state.shape[1])


def qlora_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    compute_dtype: torch.dtype | None = None,
    keep_weight: bool = False,
) -> torch.Tensor:
    """``x W^T + b + scaling * (x A^T) B^T`` with W 4-bit (``packed``, ``state``); b does not train.
    ``keep_weight``: keep the forward's dequantized W for backward (under gradient checkpointing)."""
    if bias is not None and bias.requires_grad:
        raise InputError("qlora_linear keeps the base frozen: its bias must not require grad")
    compute_dtype = compute_dtype or x.dtype
    bias = bias.to(compute_dtype) if bias is not None else None
    return _QLoRALinear.apply(x, packed, state, bias, lora_a, lora_b, scaling, compute_dtype, keep_weight)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``x W^T + b + scaling * (x A^T) B^T`` for a dense frozen W (and b), in one node as
    ``qlora_linear``: the same LoRA math, the base product ``F.linear`` in W's dtype."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise InputError("lora_linear keeps the base frozen: its weight and bias must not require grad")
    return _QLoRALinear.apply(x, weight, None, bias, lora_a, lora_b, scaling, weight.dtype, False)
