"""The 4-bit matmul op: y = x @ dequant(W4)^T + b, with W4 packed and never kept dense.

One op, ``fourbit::matmul_4bit``, dispatched on the tensors' device when it runs:

- every device (the reference): dequantize through ``fourbit::dequantize_4bit`` (itself
  dispatched: the CPU kernels, the Triton kernel on CUDA), then ``F.linear``;
- CPU: for up to 32 rows of x (16 in bf16 on AVX512-BF16: decoding, short prompts) the native
  kernel of kernels/cpu/native.py reads the 4-bit codes once, looking them up 16 or 32 at
  a time in vector registers, 5-10x faster than dequantize + matmul at one row; more rows
  (prefill, training) in float32 go to its register-blocked product that dequantizes W inside
  itself (kernels/cpu/gemm_4bit.c, AVX-512 or AVX2: 1.1-1.4x dequantize + matmul on SmolLM2's
  shapes, bench/bench_train_products.py), in bf16 they share one dequantization and oneDNN's matmul;
- CUDA: for a single row of x (decoding one sequence) the fused Triton kernel of
  kernels/triton/matmul_4bit.py reads the 4-bit bytes once and writes only y. For more rows,
  dequantizing into a temporary (one pass at ~2.6 TB/s, the buffer reused through the caching
  allocator) and calling cuBLAS is faster: on an H100 the fused kernels measured so far are
  bound by per-weight instructions (the code-table gather), not bytes, so from 2 rows on they
  lose to dequantize + cuBLAS (bench/RESULTS.md).

Gradients are not defined here: Linear4bit's autograd function (and the one-node QLoRA linear,
kernels/lora.py) call this op in forward and ``matmul_4bit_grad`` (dL/dx = g W, the same choice
of paths on a CPU) in backward.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..quant.state import QuantState
from .cpu import native as cpu_native
from .dequantize import dequantize_4bit, dequantize_4bit_cuda, dequantize_4bit_op, state_args


@torch.library.custom_op("fourbit::matmul_4bit", mutates_args=())
def matmul_4bit_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    shape: list[int],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    weight = dequantize_4bit_op(
        packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, x.dtype
    )
    return torch.nn.functional.linear(x, weight, bias)


@matmul_4bit_op.register_kernel("cpu")
def _(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, bias):
    if cpu_native.supports(x, blocksize, nested_blocksize, shape[1]):
        return cpu_native.matmul_4bit(
            x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, bias
        )
    weight = dequantize_4bit_op(
        packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, x.dtype
    )
    return torch.nn.functional.linear(x, weight, bias)


@matmul_4bit_op.register_kernel("cuda")
def _(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, bias):
    from .triton import matmul_4bit as fused

    rows = x.numel() // max(x.shape[-1], 1)
    if rows == 1 and fused.supports(x, blocksize, shape[1]):
        return fused.matmul_4bit(
            x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, bias
        )
    weight = dequantize_4bit_cuda(  # the kernel itself: no second trip through the dispatcher
        packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, x.dtype
    )
    return torch.nn.functional.linear(x, weight, bias)


@matmul_4bit_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, bias):
    return x.new_empty(*x.shape[:-1], shape[0])


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for the 4-bit weight (``packed``, ``state``) of shape [out, in], in x's dtype."""
    if x.shape[-1] != state.shape[1]:
        raise InputError(f"input has {x.shape[-1]} features; the 4-bit weight {tuple(state.shape)} expects {state.shape[1]}")
    args = state_args(state)
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        # the op's CPU kernel without the op's two dispatches (~60 us a call: a training step makes
        # ~200 of these); a compiled graph keeps the op
        if cpu_native.supports(x, state.blocksize, args[6], state.shape[1]):
            return cpu_native.matmul_4bit(x, packed, *args, bias)
        native = cpu_native.Weight4bit(packed, *args)
        if native.trains(x):  # float32, many rows: W dequantized inside the product (gemm_4bit.c)
            return native.linear(x, bias)
        return torch.nn.functional.linear(x, dequantize_4bit(packed, state, x.dtype), bias)
    return matmul_4bit_op(x, packed, *args, bias)


def matmul_4bit_grad(grad: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """``grad @ W`` for the 4-bit weight W [out, in] (dL/dx of ``matmul_4bit``), in grad's dtype.

    On a CPU in float32 with many rows, W is dequantized inside the product (gemm_4bit.c); the
    twin, everywhere else: dequantize, then matmul."""
    if grad.shape[-1] != state.shape[0]:
        raise InputError(f"the gradient has {grad.shape[-1]} features; the 4-bit weight {tuple(state.shape)} "
                         f"has {state.shape[0]} outputs")
    if grad.device.type == "cpu" and not torch.compiler.is_compiling():
        native = cpu_native.Weight4bit(packed, *state_args(state))
        if native.trains(grad):
            return native.linear_grad(grad)
    return grad @ dequantize_4bit(packed, state, grad.dtype)
