"""Triton: packed 4-bit codes + (double-quantized) absmax -> dense weight, in one pass.

    byte j of the packed weight holds values 2j (high nibble) and 2j+1 (low nibble)
    scale_b = code8[absmax_b] * nested_absmax[b // 256] + offset      (double quantization)
            = absmax_b                                                (otherwise)
    w_v     = code4[nibble_v] * scale_{v // blocksize}

Each program owns ROWS whole quantization blocks, laid out as a [ROWS, blocksize/2] tile of
bytes: one uint8 load per byte, two gathers from the 16-entry code table (L1-resident), one
scale per row of the tile, and the two nibbles' values joined and stored as contiguous runs.
Bytes moved per value: 1/2 (codes) + 1/blocksize (absmax) + output element size; nothing else.

Rounding: the scale's multiply and add may be contracted into one FMA by the compiler, where
the reference rounds the product first; that moves a scale by at most one float32 ulp, so an
output value by at most one ulp of the output dtype (tests/kernels/test_triton_dequantize.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

VALUES_PER_PROGRAM = 2048  # 1 KiB of codes in, 4 KiB of bf16 out per program: fastest of 2048..16384 on an H100


@triton.jit
def load_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blocks, mask,
                DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """float32 scale of each quantization block in ``blocks`` (decoding 8-bit absmax codes)."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blocks, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + blocks // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + q) * nested + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blocks, mask=mask, other=0.0)
    return scale


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
    numel, nblocks,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROWS: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    first = tl.program_id(0).to(tl.int64) * ROWS  # 64-bit base, 32-bit offsets within the program
    packed_ptr += first * HALF
    out_ptr += first * BLOCKSIZE
    rows = tl.arange(0, ROWS)
    byte = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    left = numel - first * BLOCKSIZE  # values from this program's start to the end
    codes = tl.load(packed_ptr + byte, mask=2 * byte < left, other=0)
    scale = load_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, first + rows,
                        first + rows < nblocks, DOUBLE_QUANT, NESTED_BLOCKSIZE)[:, None]
    high = tl.load(code_ptr + (codes >> 4)) * scale
    low = tl.load(code_ptr + (codes & 15)) * scale
    values = tl.reshape(tl.join(high, low), (ROWS, BLOCKSIZE))
    index = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=index < left)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    values_per_program: int = VALUES_PER_PROGRAM,
    num_warps: int = 4,
) -> torch.Tensor:
    """Launch on the tensors' device; arguments as the ``fourbit::dequantize_4bit`` op's, plus
    an optional contiguous ``out`` of ``shape`` and ``dtype`` to write into, and the launch
    shape (bench/bench_dequantize.py --sweep times the alternatives)."""
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    numel = out.numel()
    nblocks = -(-numel // blocksize)
    rows = max(1, values_per_program // blocksize)
    double_quant = nested_absmax is not None
    _dequantize_4bit_kernel[(triton.cdiv(nblocks, rows),)](
        packed.view(torch.uint8), absmax, code,
        nested_absmax if double_quant else absmax, nested_code if double_quant else code,
        nested_offset if double_quant else absmax,
        out, numel, nblocks,
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize if double_quant else 1,
        DOUBLE_QUANT=double_quant, ROWS=rows, num_warps=num_warps,
    )
    return out
