"""Triton: y = x @ dequant(W4)^T (+ b) for few rows of x, reading the packed weight once.

    W4: [N, K] packed row-major, byte j of row n holds W[n, 2j] (high nibble), W[n, 2j+1] (low)
    y[m, n] = sum_k x[m, k] * code4[W4[n, k]] * scale[n, k // blocksize]

At decode sizes (M of 1 to ~64) the product is bound by reading W: 4 bits a weight instead of
16 is the whole speed-up, provided the kernel keeps enough bytes in flight. A [N, K] weight
split only along N gives too few programs for that (4096 rows in tiles of 16 is 256 programs
on 132 multiprocessors), so K is split too: ``split_k`` programs share each output tile, each
covering a slice of the quantization blocks, and add their partial sums into a float32 buffer
(atomics; the order of those additions, hence the last bits of y, may vary run to run), which
is then cast to x's dtype. Both kernels need the blocks to tile the rows (blocksize divides
K), so a block never straddles two rows; the op falls back to dequantize + matmul otherwise.

- ``gemv``: one row of x per program, CUDA cores, float32 throughout; each block's products
  are summed before its scale multiplies them (once per block, not per weight: 11% faster at
  M = 1 on an H100). For M up to ~4 (programs of the same weight tile run side by side, so
  the rows after the first read W from L2). Options, to be timed on a GPU
  (bench/bench_matmul_4bit.py --sweep) after tools/inspect_sass.py counted their loop
  instructions a weight on sm_90 (the default, timed at 38.6 us for 14336x4096: 8.3): ``prefetch`` (Triton
  pipelines only loads feeding ``tl.dot``, so each step otherwise waits out the codes' memory
  latency before its arithmetic), ``table="shared"`` (one address + LDS a nibble instead of
  two + LDG: 7.0 with prefetch) and ``unpack="words"`` (eight nibbles a 32-bit load, one FMA
  each instead of a tree: 5.8 with the shared table, 64-row tiles).
- ``matmul``: [BLOCK_M, BLOCK_N] output tiles through ``tl.dot``: each step dequantizes a
  [BLOCK_N, nb * blocksize] tile exactly as the dequantize kernel does (float32 product,
  rounded to x's dtype) and multiplies it on the tensor cores. For larger M. With the table in
  global memory, Triton's pipeliner turns every table read into a 4-byte ``cp.async`` into
  shared memory (about one LDGSTS a weight in the SASS), a likely cause of this kernel's 10x gap
  to dequantize + cuBLAS; ``table="shared"`` leaves only the codes and x to the pipeliner.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...errors import InputError
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
def _code_values(code_ptr, table, nibbles, SHARED_TABLE: tl.constexpr):
    """code4[nibbles], as float32. From ``table`` (the 16 codes, loaded once per program) through
    ``tl.gather``, which Triton lowers to shared-memory reads with 32-bit addresses; or straight
    from the code table in global memory (L1-resident), one 64-bit address per nibble."""
    if SHARED_TABLE:
        return tl.reshape(tl.gather(table, tl.reshape(nibbles, (nibbles.numel,)), 0), nibbles.shape)
    else:
        return tl.load(code_ptr + nibbles)


@triton.jit
def _gemv_loads(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, rows, row_ok, kb, last,
                blocks_per_row, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                NB: tl.constexpr, WORDS: tl.constexpr):
    """One gemv step's weight inputs, blocks kb.. (from ``last`` on: masked): the codes, as
    [BLOCK_N, NB, blocksize/2] bytes or [BLOCK_N, NB, blocksize/8] int32 words, and the scales."""
    PER_BLOCK: tl.constexpr = BLOCKSIZE // 8 if WORDS else BLOCKSIZE // 2
    block = kb + tl.arange(0, NB)
    ok = row_ok[:, None] & (block < last)[None, :]
    blocks = rows[:, None] * blocks_per_row + block[None, :]  # [BLOCK_N, NB]
    codes_ptr = packed_ptr.to(tl.pointer_type(tl.int32)) if WORDS else packed_ptr
    j = tl.arange(0, PER_BLOCK)
    codes = tl.load(codes_ptr + blocks[:, :, None] * PER_BLOCK + j[None, None, :], mask=ok[:, :, None], other=0)
    scale = load_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blocks, ok,
                        DOUBLE_QUANT, NESTED_BLOCKSIZE)
    return codes, scale


@triton.jit
def _gemv_block_sums(x_row, code_ptr, table, codes, kb, last,
                     BLOCKSIZE: tl.constexpr, NB: tl.constexpr, SHARED_TABLE: tl.constexpr, WORDS: tl.constexpr):
    """[BLOCK_N, NB]: sum over each block of code4[nibble] * x[column], before the block's scale.

    Bytes: the high nibbles meet the even columns of x and the low nibbles the odd ones, so the
    two halves of a byte are never interleaved. Words (four bytes, little-endian): nibble s of a
    word is column 2 * (s // 2) + 1 - s % 2 of its eight; the eight nibbles are taken in turn,
    each a shift and a mask, and their products accumulate one FMA each."""
    block = kb + tl.arange(0, NB)
    x_ok = (block < last)[:, None]
    if WORDS:
        word = block[:, None] * BLOCKSIZE + 8 * tl.arange(0, BLOCKSIZE // 8)[None, :]  # [NB, words]: first columns
        sums = tl.zeros(codes.shape, dtype=tl.float32)
        for s in tl.static_range(8):
            x = tl.load(x_row + word + (2 * (s // 2) + 1 - s % 2), mask=x_ok, other=0.0).to(tl.float32)
            sums += _code_values(code_ptr, table, (codes >> (4 * s)) & 15, SHARED_TABLE) * x[None, :, :]
    else:
        even = block[:, None] * BLOCKSIZE + 2 * tl.arange(0, BLOCKSIZE // 2)[None, :]  # [NB, HALF]
        x_even = tl.load(x_row + even, mask=x_ok, other=0.0).to(tl.float32)[None, :, :]
        x_odd = tl.load(x_row + even + 1, mask=x_ok, other=0.0).to(tl.float32)[None, :, :]
        high = _code_values(code_ptr, table, codes >> 4, SHARED_TABLE)
        low = _code_values(code_ptr, table, codes & 15, SHARED_TABLE)
        sums = high * x_even + low * x_odd
    return tl.sum(sums, axis=2)


@triton.jit
def _gemv_4bit_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr, out_ptr,
    N, K, stride_xm, stride_om, blocks_per_split,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, NB: tl.constexpr, SPLIT: tl.constexpr, SHARED_TABLE: tl.constexpr, PREFETCH: tl.constexpr,
    WORDS: tl.constexpr,
):
    m = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    blocks_per_row = K // BLOCKSIZE
    first = tl.program_id(2) * blocks_per_split
    last = tl.minimum(first + blocks_per_split, blocks_per_row)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    table = tl.load(code_ptr + tl.arange(0, 16))
    acc = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    if PREFETCH:
        codes, scale = _gemv_loads(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, rows, row_ok,
                                   first, last, blocks_per_row, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, NB, WORDS)
    for kb in range(first, last, NB):
        if PREFETCH:  # the next step's loads go out before this step's arithmetic (masked past the end)
            next_codes, next_scale = _gemv_loads(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                                 rows, row_ok, kb + NB, last, blocks_per_row, BLOCKSIZE,
                                                 NESTED_BLOCKSIZE, DOUBLE_QUANT, NB, WORDS)
        else:
            codes, scale = _gemv_loads(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, rows,
                                       row_ok, kb, last, blocks_per_row, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, NB,
                                       WORDS)
        # a block's products first, then its scale: once per block
        acc += _gemv_block_sums(x_row, code_ptr, table, codes, kb, last, BLOCKSIZE, NB, SHARED_TABLE, WORDS) * scale
        if PREFETCH:
            codes, scale = next_codes, next_scale
    y = tl.sum(acc, axis=1)
    _epilogue(y, bias_ptr, out_ptr, m.to(tl.int64) * stride_om + rows, row_ok, tl.where(row_ok, rows, 0),
              tl.program_id(2) == 0, HAS_BIAS, SPLIT)


@triton.jit
def _matmul_4bit_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, blocks_per_split,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, SPLIT: tl.constexpr, SHARED_TABLE: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    BLOCK_K: tl.constexpr = NB * BLOCKSIZE
    rows_w = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_x = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    x_ok, w_ok = rows_x < M, rows_w < N
    blocks_per_row = K // BLOCKSIZE
    first = tl.program_id(2) * blocks_per_split
    last = tl.minimum(first + blocks_per_split, blocks_per_row)
    jb = tl.arange(0, NB)
    jh = tl.arange(0, HALF)
    x_rows = x_ptr + rows_x.to(tl.int64)[:, None] * stride_xm
    table = tl.load(code_ptr + tl.arange(0, 16))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(first, last, NB):
        block = kb + jb
        ok = w_ok[:, None] & (block < last)[None, :]
        blocks = rows_w[:, None] * blocks_per_row + block[None, :]  # [BLOCK_N, NB]
        codes = tl.load(packed_ptr + blocks[:, :, None] * HALF + jh[None, None, :], mask=ok[:, :, None], other=0)
        scale = load_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blocks, ok,
                            DOUBLE_QUANT, NESTED_BLOCKSIZE)[:, :, None]
        high = _code_values(code_ptr, table, codes >> 4, SHARED_TABLE) * scale
        low = _code_values(code_ptr, table, codes & 15, SHARED_TABLE) * scale
        cols = kb * BLOCKSIZE + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + cols[None, :], mask=x_ok[:, None] & (cols < last * BLOCKSIZE)[None, :], other=0.0)
        w = tl.reshape(tl.join(high, low), (BLOCK_N, BLOCK_K)).to(x.dtype)  # = dequant(W) tile, as the op rounds it
        acc = tl.dot(x, tl.trans(w), acc)
    out_index = rows_x.to(tl.int64)[:, None] * stride_om + rows_w[None, :]
    _epilogue(acc, bias_ptr, out_ptr, out_index, x_ok[:, None] & w_ok[None, :], tl.where(w_ok, rows_w, 0)[None, :],
              tl.program_id(2) == 0, HAS_BIAS, SPLIT)


@dataclass(frozen=True)
class Config:
    """Launch shape. ``kernel``: "gemv" (block_n weight rows x nb quantization blocks per step,
    one row of x per program) or "matmul" (block_m x block_n output tiles, nb blocks of K per
    step). ``split_k``: programs sharing one output along K (adding into a float32 buffer);
    None picks enough for ``PROGRAMS_PER_SM`` programs per multiprocessor. ``table``: where the
    16 codes are read from per nibble, "global" (L1) or "shared" (see ``_code_values``).
    ``prefetch`` (gemv): issue each step's loads one step ahead, so that the codes' memory
    latency overlaps the previous step's arithmetic (Triton software-pipelines only loads that
    feed ``tl.dot``). ``unpack`` (gemv): read the codes as "bytes" or as int32 "words" of eight
    nibbles (see ``_gemv_block_sums``; the packed weight must then be 4-byte aligned)."""

    kernel: str
    block_n: int
    nb: int = 4
    block_m: int = 16
    num_warps: int = 4
    num_stages: int = 3
    split_k: int | None = None
    table: str = "global"
    prefetch: bool = False
    unpack: str = "bytes"

    def __post_init__(self):
        if self.kernel not in ("gemv", "matmul"):
            raise InputError(f"kernel {self.kernel!r}: expected 'gemv' or 'matmul'")
        if self.table not in ("global", "shared"):
            raise InputError(f"table {self.table!r}: expected 'global' or 'shared'")
        if self.unpack not in ("bytes", "words"):
            raise InputError(f"unpack {self.unpack!r}: expected 'bytes' or 'words'")
        if self.kernel != "gemv" and (self.prefetch or self.unpack != "bytes"):
            raise InputError("prefetch and unpack='words' apply to the gemv kernel only")


PROGRAMS_PER_SM = 8
GEMV = Config("gemv", block_n=32, nb=4, num_warps=4)  # the launch shape for few rows of x


def sweep_configs() -> tuple[list[Config], list[Config]]:
    """(gemv, matmul) launch shapes under study: what bench/bench_matmul_4bit.py --sweep times on a GPU
    and tools/inspect_sass.py counts instructions for (the choice of defaults is open: issue notes in
    notes/gpu/README.md)."""
    gemv = [Config("gemv", block_n=bn, nb=nb, num_warps=w, table=t, prefetch=pf, unpack=u)
            for bn, nb, w, u in [(32, 4, 4, "bytes"), (16, 4, 4, "bytes"), (64, 4, 4, "words"), (32, 4, 4, "words")]
            for t in ("global", "shared") for pf in (False, True)]
    gemv += [Config("gemv", block_n=bn, nb=nb, num_warps=w, split_k=sk) for bn, nb, w, sk in
             [(16, 8, 8, None), (16, 4, 4, 1), (32, 4, 4, 8)]]
    gemv += [Config("gemv", block_n=bn, nb=nb, num_warps=w, split_k=sk, table="shared", prefetch=True, unpack="words")
             for bn, nb, w, sk in [(64, 4, 4, 1), (64, 4, 4, 4), (32, 4, 2, None), (128, 2, 8, None)]]
    mm = [Config("matmul", block_n=bn, block_m=bm, nb=nb, num_warps=w, num_stages=s, split_k=sk, table=t)
          for bm in (16, 64) for t in ("global", "shared") for bn, nb, w, s, sk in
          [(64, 4, 4, 3, None), (32, 4, 4, 3, None), (128, 2, 4, 3, None), (64, 2, 4, 4, None),
           (64, 8, 8, 3, None), (64, 4, 4, 3, 4)]]
    return gemv, mm


def default_config(m: int, n: int, k: int) -> Config:
    """The launch shape chosen for an [m, k] x [k, n] product (see bench/bench_matmul_4bit.py)."""
    if m <= 4:
        return GEMV
    return Config("matmul", block_n=64, nb=4, block_m=16 if m <= 16 else 32 if m <= 32 else 64, num_warps=4)


def supports(x: torch.Tensor, blocksize: int, k: int) -> bool:
    """Whether these kernels can take this product (else: dequantize, then matmul)."""
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
    config = config or default_config(m, n, k)
    if config.unpack == "words" and packed.data_ptr() % 4:
        raise InputError("unpack='words' reads the packed weight as int32: its storage must be 4-byte aligned")
    double_quant = nested_absmax is not None
    blocks_per_row = k // blocksize
    if config.kernel == "gemv":
        tiles = m * triton.cdiv(n, config.block_n)
    else:
        tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    per_split = _blocks_per_split(config, tiles, blocks_per_row, x.device)
    splits = triton.cdiv(blocks_per_row, per_split)
    target = torch.zeros(m, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    args = (
        x2, packed.view(torch.uint8), absmax, code,
        nested_absmax if double_quant else absmax, nested_code if double_quant else code,
        nested_offset if double_quant else absmax, bias if bias is not None else x2, target,
    )
    common = dict(
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize if double_quant else 1,
        DOUBLE_QUANT=double_quant, HAS_BIAS=bias is not None, NB=config.nb, SPLIT=splits > 1,
        SHARED_TABLE=config.table == "shared", num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if config.kernel == "gemv":
        grid = (m, triton.cdiv(n, config.block_n), splits)
        _gemv_4bit_kernel[grid](*args, n, k, x2.stride(0), n, per_split, BLOCK_N=config.block_n,
                                PREFETCH=config.prefetch, WORDS=config.unpack == "words", **common)
    else:
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), splits)
        _matmul_4bit_kernel[grid](*args, m, n, k, x2.stride(0), n, per_split,
                                  BLOCK_M=config.block_m, BLOCK_N=config.block_n, **common)
    if splits > 1:
        out.copy_(target)
    return out.view(*x.shape[:-1], n)
