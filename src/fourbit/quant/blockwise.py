"""Block-wise absmax quantization to a code table, and 4-bit packing.

For a tensor x flattened row-major into n values and cut into blocks of B consecutive values
(blocks cross row boundaries; the last block may be short):

    absmax[b] = max |x_i|  over block b                         (float32)
    code_i    = nearest entry of the table to  x_i * (1 / absmax[b])
    x_i      ~= table[code_i] * absmax[b]

"Nearest" uses the float32 midpoints between neighbouring table values, a value exactly on a
midpoint going to the lower level, as bitsandbytes' torch backend does. FP4 has both +0 and -0:
a value rounding to zero keeps its sign, as in bitsandbytes' CUDA kernel (its CPU backend picks
between the two by sort order instead; both decode to 0).
All arithmetic is float32 whatever the input dtype, so fp16/bf16 inputs give the same codes
as their float32 upcast.

Packing: two 4-bit codes per byte, element 2k in the HIGH nibble and element 2k+1 in the low
nibble; an odd count is padded with the code of the value 0 (7 for NF4, 0 for FP4), as if the
tensor had one more zero. This is bitsandbytes' layout, padding included.
"""

from __future__ import annotations

import torch

from ..errors import InputError

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
CHUNK = 1 << 20  # elements quantized per step: a multiple of every block size
QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise InputError(f"unsupported block size {blocksize!r}; expected one of {BLOCKSIZES}")


def check_quantizable(x: torch.Tensor, what: str = "tensor") -> None:
    """Refuse what block-wise quantization cannot represent: wrong dtypes, NaN and Inf."""
    if x.dtype not in QUANTIZABLE_DTYPES:
        raise InputError(f"cannot quantize {what} of dtype {x.dtype}; expected one of {QUANTIZABLE_DTYPES}")
    if x.numel() == 0:
        raise InputError(f"cannot quantize {what}: it is empty")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise InputError(f"cannot quantize {what}: it holds {bad} NaN/Inf value(s) (shape {tuple(x.shape)})")


def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Per-block max |x| of a flat float32 tensor; the last block may be short."""
    padded = torch.nn.functional.pad(flat.abs(), (0, (-flat.numel()) % blocksize))  # zeros never raise a max
    return padded.view(-1, blocksize).amax(dim=1)


def scale_to_unit(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x * (1/absmax) per block, clamped to [-1, 1]; an all-zero block stays zero."""
    inverse = 1.0 / absmax.clamp(min=1e-38)
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % blocksize))
    return (padded.view(-1, blocksize) * inverse[:, None]).clamp_(-1, 1).view(-1)[: flat.numel()]


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry for values in [-1, 1] (see the module docstring)."""
    order = torch.argsort(code, stable=True)  # stable: of two equal levels the first code wins
    levels = code[order]
    midpoints = (levels[:-1] + levels[1:]) / 2
    idx = order[torch.bucketize(scaled, midpoints, out_int32=True)]  # count of midpoints < x: ties go down
    negative_zero = (torch.signbit(code) & (code == 0)).nonzero()
    if len(negative_zero):  # sign-magnitude table (FP4): zero keeps the input's sign
        positive_zero = ((code == 0) & ~torch.signbit(code)).nonzero()
        is_zero = code[idx] == 0
        signed_zero = torch.where(scaled < 0, negative_zero[0], positive_zero[0])
        idx = torch.where(is_zero, signed_zero, idx)
    return idx.to(torch.uint8)


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to indices into ``code``: (uint8 codes [numel], float32 absmax [nblocks]).

    Works through the tensor in chunks of CHUNK elements, so temporary memory stays a few tens
    of MB however large the weight is.
    """
    check_blocksize(blocksize)
    flat = x.reshape(-1)
    n = flat.numel()
    code = code.to(flat.device)
    codes = torch.empty(n, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    for start in range(0, n, CHUNK):
        part = flat[start : start + CHUNK].float()
        part_absmax = block_absmax(part, blocksize)
        absmax[start // blocksize : start // blocksize + part_absmax.numel()] = part_absmax
        codes[start : start + part.numel()] = nearest_code(scale_to_unit(part, part_absmax, blocksize), code)
    return codes, absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: float32 values [numel]."""
    values = code.to(codes.device)[codes.int()]
    full = values.numel() - values.numel() % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    if full < values.numel():
        values[full:].mul_(absmax[-1])
    return values


def pack_4bit(codes: torch.Tensor, pad_code: int = 0) -> torch.Tensor:
    """Flat 4-bit codes -> bytes, first element of each pair in the high nibble; shape [(n+1)//2, 1]."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.nn.functional.pad(codes, (0, 1), value=pad_code)
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Bytes -> the first ``numel`` flat 4-bit codes (uint8)."""
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8:  # bf16/fp16/fp32 storage (FSDP) holds the same bytes
        packed = packed.view(torch.uint8)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return codes[:numel]
