"""Double quantization: the per-block absmax constants, themselves quantized to 8 bits.

With 64-value blocks a float32 absmax costs 32/64 = 0.5 bits per weight. QLoRA (§3) stores
them in 8 bits instead, in blocks of 256 with a float32 scale each:

    offset          = mean(absmax)                                   float32 scalar
    codes, nested   = block-wise 8-bit quantization of (absmax - offset) with the signed
                      dynamic map, 256 values per block                  uint8, float32
    absmax_i       ~= map[codes_i] * nested[i // 256] + offset

which costs 8/64 + 32/(64*256) = 0.127 bits per weight, so NF4 with double quantization at
block 64 stores 4.127 bits per weight. Subtracting the mean first centres the (all positive)
absmax values so the signed map's resolution is spent where they are. Arithmetic is float32
in the order written above, as bitsandbytes does it, so decoded values match it bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blockwise import dequantize_blockwise, quantize_blockwise
from .dtypes import dynamic_map

NESTED_BLOCKSIZE = 256


@dataclass(frozen=True)
class NestedState:
    """What decodes the 8-bit absmax codes: per-256-block scales, the map and the offset."""

    absmax: torch.Tensor  # float32 [ceil(nblocks / blocksize)]
    code: torch.Tensor  # float32 [256], the signed dynamic map
    offset: torch.Tensor  # float32 scalar, mean of the original absmax values
    blocksize: int = NESTED_BLOCKSIZE

    def to(self, device: torch.device | str) -> NestedState:
        return NestedState(self.absmax.to(device), self.code.to(device), self.offset.to(device), self.blocksize)


def compress_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, NestedState]:
    """float32 absmax [n] -> (uint8 codes [n], the state that decodes them)."""
    offset = absmax.mean()
    code = dynamic_map(signed=True).to(absmax.device)
    codes, nested_absmax = quantize_blockwise(absmax - offset, code, NESTED_BLOCKSIZE)
    return codes, NestedState(nested_absmax, code, offset, NESTED_BLOCKSIZE)


def decompress_absmax(codes: torch.Tensor, nested: NestedState) -> torch.Tensor:
    """uint8 codes [n] -> float32 absmax [n]."""
    return dequantize_blockwise(codes, nested.absmax, nested.code, nested.blocksize) + nested.offset
