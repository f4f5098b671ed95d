"""The dequantize op: packed 4-bit codes + QuantState -> a dense weight.

One op, ``fourbit::dequantize_4bit``, registered with torch.library so it dispatches on the
tensors' device when it runs and composes with torch.compile (its fake implementation gives
the output's shape and dtype). The implementation registered for every device is the
plain-torch reference in ``fourbit.quant.four_bit``; a device with a faster kernel (the
Triton kernel on CUDA) registers it on this op with ``dequantize_4bit_op.register_kernel``
and is tested against that reference.
"""

from __future__ import annotations

import torch

from ..quant.double_quant import NestedState
from ..quant.four_bit import dequantize_4bit_reference
from ..quant.state import QuantState


@torch.library.custom_op("fourbit::dequantize_4bit", mutates_args=())
def dequantize_4bit_op(
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
) -> torch.Tensor:
    nested = None
    if nested_absmax is not None:
        nested = NestedState(nested_absmax, nested_code, nested_offset, nested_blocksize)
    state = QuantState("", blocksize, torch.Size(shape), dtype, absmax, code, nested)
    return dequantize_4bit_reference(packed, state, dtype)


@dequantize_4bit_op.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight of ``state.shape`` in ``dtype`` (default: the original weight's dtype)."""
    nested = state.nested
    return dequantize_4bit_op(
        packed,
        state.absmax,
        state.code,
        nested.absmax if nested is not None else None,
        nested.code if nested is not None else None,
        nested.offset if nested is not None else None,
        state.blocksize,
        nested.blocksize if nested is not None else 0,
        list(state.shape),
        dtype or state.dtype,
    )
