"""Triton: y = x @ dequant(W4)^T (+ b) for a single row of x (decoding), reading the packed weight once.

    W4: [N, K] packed row-major, byte j of row n holds W[n, 2j] (high nibble), W[n, 2j+1] (low)
    y[m, n] = sum_k x[m, k] * code4[W4[n, k]] * scale[n, k // blocksize]

At decode sizes the product is bound by reading W: 4 bits a weight instead of 16 is the whole
speed-up, provided the kernel keeps enough bytes in flight. A [N, K] weight split only along N
gives too few programs for that (4096 rows in tiles of 16 is 256 programs on 132
multiprocessors), so K is split too: ``split_k`` programs share each output tile, each covering
a slice of the quantization blocks, and add their partial sums into a float32 buffer (atomics;
the order of those additions, hence the last bits of y, may vary run to run), which is then
cast to x's dtype. The blocks must tile the rows (blocksize divides K), so a block never
straddles two rows; the op falls back to dequantize + matmul otherwise.

One row of x per program, CUDA cores, float32 throughout; each block's products are summed
before its scale multiplies them (once per block, not per weight: 11% faster at M = 1 on an
H100). The op sends it one row (kernels/matmul_4bit.py); any number of rows computes the same
function, which the tests use. The launch-shape options and the tensor-core kernel for more rows
that were studied for it are in git, not here (notes/gpu/README.md says where).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dequantize import load_scales


@triton.jit
def _epilogue(y, bias_ptr, out_ptr, out_index, mask, cols, first_split,
              HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Add the bias (once) and store y, or add it into the float32 output when K is split."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cols >= 0, other=0.0).to(tl.float32)
        y += tl.where(first_split, bias, 0.0)
    if SPLIT:
        tl.atomic_add(out_ptr + out_index, y, mask=mask, sem="relaxed")
    else:
        tl.store(out_ptr + out_index, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_block_sums(x_row, code_ptr, codes, kb, last, BLOCKSIZE: tl.constexpr, NB: tl.constexpr):
    """[BLOCK_N, NB]: sum over each block of code4[nibble] * x[column], before the block's scale.
    The high nibbles meet the even columns of x and the low nibbles the odd ones, so the two
    halves of a byte are never interleaved; the 16 codes are read from global memory (L1)."""
    block = kb + tl.arange(0, NB)
    x_ok = (block < last)[:, None]
    even = block[:, None] * BLOCKSIZE + 2 * tl.arange(0, BLOCKSIZE // 2)[None, :]  # [NB, HALF]
    x_even = tl.load(x_row + even, mask=x_ok, other=0.0).to(tl.float32)[None, :, :]
    x_odd = tl.load(x_row + even + 1, mask=x_ok, other=0.0).to(tl.float32)[None, :, :]
    sums = tl.load(code_ptr + (codes >> 4)) * x_even + tl.load(code_ptr + (codes & 15)) * x_odd
    return tl.sum(sums, axis=2)


@triton.jit
def _gemv_4bit_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr, out_ptr,
    N, K, stride_xm, stride_om, blocks_per_split,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, NB: tl.constexpr, SPLIT: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    m = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    blocks_per_row = K // BLOCKSIZE
    first = tl.program_id(2) * blocks_per_split
    last = tl.minimum(first + blocks_per_split, blocks_per_row)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    for kb in range(first, last, NB):
        block = kb + tl.arange(0, NB)
        ok = row_ok[:, None] & (block < last)[None, :]
        blocks = rows[:, None] * blocks_per_row + block[None, :]  # [BLOCK_N, NB]
        codes = tl.load(packed_ptr + blocks[:, :, None] * HALF + tl.arange(0, HALF)[None, None, :],
                        mask=ok[:, :, None], other=0)
        scale = load_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blocks, ok,
                            DOUBLE_QUANT, NESTED_BLOCKSIZE)
        # a block's products first, then its scale: once per block
        acc += _gemv_block_sums(x_row, code_ptr, codes, kb, last, BLOCKSIZE, NB) * scale
    y = tl.sum(acc, axis=1)
    _epilogue(y, bias_ptr, out_ptr, m.to(tl.int64) * stride_om + rows, row_ok, tl.where(row_ok, rows, 0),
              tl.program_id(2) == 0, HAS_BIAS, SPLIT)


@dataclass(frozen=True)
class Config:
    """Launch shape: ``block_n`` weight rows x ``nb`` quantization blocks per loop step;
    ``split_k`` programs sharing one output along K (adding into a float32 buffer), None for
    enough to give each multiprocessor ``PROGRAMS_PER_SM`` programs."""

    block_n: int
    nb: int = 4
    num_warps: int = 4
    num_stages: int = 3
    split_k: int | None = None


PROGRAMS_PER_SM = 8
GEMV = Config(block_n=32, nb=4, num_warps=4)  # timed at 38.6 us for 14336x4096 on an H100 (bench/RESULTS.md)


def supports(x: torch.Tensor, blocksize: int, k: int) -> bool:
    """Whether this kernel can take this product (else: dequantize, then matmul)."""
    return x.dtype in (torch.bfloat16, torch.float16) and k % blocksize == 0 and x.shape[-1] == k


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _blocks_per_split(config: Config, tiles: int, blocks_per_row: int, device: torch.device) -> int:
    steps = -(-blocks_per_row // config.nb)  # loop steps over one whole row
    split = config.split_k or max(1, PROGRAMS_PER_SM * _multiprocessors(device) // tiles)
    return config.nb * -(-steps // min(split, steps))


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
    config = config or GEMV
    double_quant = nested_absmax is not None
    blocks_per_row = k // blocksize
    per_split = _blocks_per_split(config, m * triton.cdiv(n, config.block_n), blocks_per_row, x.device)
    splits = triton.cdiv(blocks_per_row, per_split)
    target = torch.zeros(m, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    grid = (m, triton.cdiv(n, config.block_n), splits)
    _gemv_4bit_kernel[grid](
        x2, packed.view(torch.uint8), absmax, code,
        nested_absmax if double_quant else absmax, nested_code if double_quant else code,
        nested_offset if double_quant else absmax, bias if bias is not None else x2, target,
        n, k, x2.stride(0), n, per_split,
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize if double_quant else 1, DOUBLE_QUANT=double_quant,
        HAS_BIAS=bias is not None, BLOCK_N=config.block_n, NB=config.nb, SPLIT=splits > 1,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits > 1:
        out.copy_(target)
    return out.view(*x.shape[:-1], n)
