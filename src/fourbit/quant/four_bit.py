"""4-bit quantization of a whole tensor: the reference path every fast kernel is tested against.

    quantize_4bit(W)   = pack(codes), QuantState(absmax or its 8-bit codes, table, shape, ...)
    dequantize_4bit    = table[unpack(bytes)] * absmax[block]   (float32, then cast)

See blockwise.py for the block and rounding rules, double_quant.py for the absmax codes and
state.py for the serialized form. The packed weight is uint8 of shape [(numel + 1) // 2, 1],
bitsandbytes' layout, so its bytes can be written to and read from bnb-4bit checkpoints as is.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .blockwise import (
    check_blocksize,
    check_quantizable,
    dequantize_blockwise,
    nearest_code,
    pack_4bit,
    quantize_blockwise,
    unpack_4bit,
)
from .double_quant import compress_absmax
from .dtypes import check_quant_type, get_code
from .state import QuantState


def quantize_4bit(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    name: str = "weight",
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``weight`` block-wise to 4 bits: (packed uint8 [(n+1)//2, 1], its QuantState)."""
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    check_quantizable(weight, name)
    code = get_code(quant_type).to(weight.device)
    codes, absmax = quantize_blockwise(weight, code, blocksize)
    nested = None
    if double_quant:
        absmax, nested = compress_absmax(absmax)
    state = QuantState(quant_type, blocksize, weight.shape, weight.dtype, absmax, code, nested)
    zero_code = int(nearest_code(torch.zeros(1, device=code.device), code))
    return pack_4bit(codes, pad_code=zero_code), state


def dequantize_4bit_reference(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch dequantization to ``dtype`` (default: the original weight dtype)."""
    expected = state.packed_shape[0]
    if packed.numel() * packed.element_size() != expected:
        raise InputError(
            f"packed 4-bit weight holds {packed.numel() * packed.element_size()} bytes; "
            f"a weight of shape {tuple(state.shape)} needs {expected}"
        )
    codes = unpack_4bit(packed, state.numel)
    values = dequantize_blockwise(codes, state.float_absmax(), state.code, state.blocksize)
    return values.view(state.shape).to(dtype or state.dtype)
