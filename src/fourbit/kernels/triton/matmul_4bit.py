"""Triton: y = x @ dequant(W4)^T (+ b) for few rows of x, reading the packed weight once.

    W4: [N, K] packed row-major, byte j of row n holds W[n, 2j] (high nibble), W[n, 2j+1] (low)
    y[m, n] = sum_b scale[n, b] * sum_{k in block b} code4[W4[n, k]] * x[m, k]

Two facts make this cheap. The scale is constant over a quantization block, so it multiplies
each block's partial sum, not every weight. And the high nibbles pair with the even columns of
x and the low nibbles with the odd ones, so the two halves of a byte meet x without ever being
interleaved: no dequantized copy of W, in memory or even in registers' natural order.

Both kernels need the blocks to tile the rows (blocksize divides K), so a block never straddles
two rows; the op falls back to dequantize + matmul otherwise.

- ``gemv``: one row of x per program column, CUDA cores, float32 accumulation; the weight is
  read from DRAM once per row of x (programs of the same weight rows run side by side, so more
  rows mostly hit L2). For decode (M = 1).
- ``matmul``: a [BLOCK_M, BLOCK_N] tile per program, tensor cores through ``tl.dot`` on the
  unscaled code values (exact in bf16/fp16 up to the table's rounding), scaled per block in
  float32. For small batches (M up to ~64), where the product is still bound by the weight bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dequantize import load_scales


@triton.jit
def _gemv_4bit_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr, out_ptr,
    N, K, stride_xm, stride_om,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, NB: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    m = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    blocks_per_row = K // BLOCKSIZE
    jb = tl.arange(0, NB)
    jh = tl.arange(0, HALF)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    for kb in range(0, blocks_per_row, NB):  # the launcher makes NB divide blocks_per_row
        blocks = rows[:, None] * blocks_per_row + (kb + jb)[None, :]  # [BLOCK_N, NB]
        codes = tl.load(packed_ptr + blocks[:, :, None] * HALF + jh[None, None, :], mask=row_ok[:, None, None], other=0)
        col = (kb + jb)[:, None] * BLOCKSIZE + 2 * jh[None, :]  # [NB, HALF]: the even columns
        x_even = tl.load(x_row + col).to(tl.float32)[None, :, :]
        x_odd = tl.load(x_row + col + 1).to(tl.float32)[None, :, :]
        part = tl.sum(tl.load(code_ptr + (codes >> 4)) * x_even + tl.load(code_ptr + (codes & 15)) * x_odd, axis=2)
        acc += part * load_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blocks,
                                  row_ok[:, None], DOUBLE_QUANT, NESTED_BLOCKSIZE)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _matmul_4bit_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    rows_x = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_w = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_ok, w_ok = rows_x < M, rows_w < N
    blocks_per_row = K // BLOCKSIZE
    jh = tl.arange(0, HALF)
    x_rows = x_ptr + rows_x.to(tl.int64)[:, None] * stride_xm + 2 * jh[None, :]  # even columns of block 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, blocks_per_row):
        blocks = rows_w * blocks_per_row + kb  # [BLOCK_N]
        codes = tl.load(packed_ptr + blocks[:, None] * HALF + jh[None, :], mask=w_ok[:, None], other=0)
        x_even = tl.load(x_rows + kb * BLOCKSIZE, mask=x_ok[:, None], other=0.0)
        x_odd = tl.load(x_rows + kb * BLOCKSIZE + 1, mask=x_ok[:, None], other=0.0)
        high = tl.load(code_ptr + (codes >> 4)).to(x_even.dtype)
        low = tl.load(code_ptr + (codes & 15)).to(x_even.dtype)
        part = tl.dot(x_even, tl.trans(high)) + tl.dot(x_odd, tl.trans(low))
        scale = load_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blocks, w_ok,
                            DOUBLE_QUANT, NESTED_BLOCKSIZE)
        acc += part * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_w, mask=w_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows_x.to(tl.int64)[:, None] * stride_om + rows_w[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=x_ok[:, None] & w_ok[None, :])


@dataclass(frozen=True)
class Config:
    """Launch shape: ``kernel`` "gemv" (block_n rows x nb quantization blocks per step) or
    "matmul" (block_m x block_n tiles); warps and pipeline stages as Triton takes them."""

    kernel: str
    block_n: int
    nb: int = 1
    block_m: int = 16
    num_warps: int = 4
    num_stages: int = 3


def default_config(m: int, n: int, k: int) -> Config:
    """The launch shape chosen for an [m, k] x [k, n] product (see bench/bench_matmul_4bit.py)."""
    if m == 1:
        return Config("gemv", block_n=16, nb=4, num_warps=4)
    return Config("matmul", block_n=64, block_m=16 if m <= 16 else 32 if m <= 32 else 64, num_warps=4)


def supports(x: torch.Tensor, blocksize: int, k: int) -> bool:
    """Whether these kernels can take this product (else: dequantize, then matmul)."""
    return x.dtype in (torch.bfloat16, torch.float16) and k % blocksize == 0 and x.shape[-1] == k


def matmul_4bit(
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
    config: Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """[..., K] @ the packed [N, K] weight^T (+ bias) -> [..., N] in x's dtype; see :func:`supports`.
    ``out``: an optional contiguous [rows of x, N] tensor to write into."""
    n, k = shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    config = config or default_config(m, n, k)
    double_quant = nested_absmax is not None
    args = (
        x2, packed.view(torch.uint8), absmax, code,
        nested_absmax if double_quant else absmax, nested_code if double_quant else code,
        nested_offset if double_quant else absmax, bias if bias is not None else x2, out,
    )
    common = dict(
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize if double_quant else 1,
        DOUBLE_QUANT=double_quant, HAS_BIAS=bias is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if config.kernel == "gemv":
        nb = config.nb
        while (k // blocksize) % nb:  # NB must divide the blocks of a row
            nb //= 2
        grid = (m, triton.cdiv(n, config.block_n))
        _gemv_4bit_kernel[grid](*args, n, k, x2.stride(0), out.stride(0), BLOCK_N=config.block_n, NB=nb, **common)
    else:
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m))
        _matmul_4bit_kernel[grid](*args, m, n, k, x2.stride(0), out.stride(0),
                                  BLOCK_M=config.block_m, BLOCK_N=config.block_n, **common)
    return out.view(*x.shape[:-1], n)
