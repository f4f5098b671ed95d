"""The dequantize op: packed 4-bit codes + QuantState -> a dense weight.

One op, ``fourbit::dequantize_4bit``, registered with torch.library so it dispatches on the
tensors' device when it runs and composes with torch.compile (its fake implementation gives
the output's shape and dtype). The implementation registered for every device is the
plain-torch reference in ``fourbit.quant.four_bit``; a device with a faster kernel registers
it on this op with ``dequantize_4bit_op.register_kernel`` and is tested against that reference.

CUDA kernel: the Triton kernel in kernels/triton/dequantize.py (one pass, double quantization
included), imported the first time a CUDA tensor arrives.

CPU kernels: the native one in C (kernels/cpu/native.c: the 16-entry table in vector
registers, 5-6x faster than the next), for whole blocks into float32 or bf16; else, for a weight
of 64 Ki values or more, the reference's formula compiled by torch.compile (kernels/cpu/
dequantize.py: a gather loop and one vectorized pass; 2.6-4.5x faster than the table kernel
below, which it falls back to where it cannot compile). All bit-identical to the reference. The table kernel (smaller
weights, odd sizes): one lookup per two packed bytes instead of unpacking nibbles. A byte b holds the
codes (b >> 4, b & 15), so two bytes read as a little-endian 16-bit index b0 + 256 b1 select
a row of a 65536 x 4 table (1 MiB, cache-resident) holding their four values in order; one
gather yields the interleaved values and each block is then scaled in place by its absmax.
Fewer and smaller temporaries than the reference (about 4x faster on this project's CPU, see
bench/RESULTS.md); the same float32 products, so bit-identical results.
"""

from __future__ import annotations

import functools
import math

import torch

from ..quant.double_quant import NestedState
from ..quant.four_bit import dequantize_4bit_reference
from ..quant.state import QuantState
from .cpu import dequantize as compiled
from .cpu import native


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
    state = _state(absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype)
    return dequantize_4bit_reference(packed, state, dtype)


def _native_takes(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape,
                  dtype) -> bool:
    numel = math.prod(shape)
    whole = packed.numel() * packed.element_size() == (numel + 1) // 2 and packed.is_contiguous()
    return whole and native.supports_dequantize(numel, blocksize, nested_blocksize, dtype)


@dequantize_4bit_op.register_kernel("cpu")
def _(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype):
    if _native_takes(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
                     shape, dtype):
        return native.dequantize_4bit(
            packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype)
    numel = math.prod(shape)
    if packed.numel() * packed.element_size() == (numel + 1) // 2 and compiled.supports(
            numel, blocksize, nested_absmax is not None, dtype):
        weight = compiled.dequantize_4bit(
            packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype)
        if weight is not None:
            return weight
    return dequantize_4bit_table(
        packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype)


def dequantize_4bit_table(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
                          shape, dtype):
    """The eager CPU kernel (the 65536-entry table, see above)."""
    state = _state(absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype)
    numel = state.numel
    data = packed.reshape(-1).view(torch.uint8)
    if data.numel() != state.packed_shape[0]:
        return dequantize_4bit_reference(packed, state, dtype)  # let the reference name the error
    if data.numel() % 2:
        data = torch.nn.functional.pad(data, (0, 1))
    index = data.view(torch.int16).to(torch.int32) & 0xFFFF  # little-endian: b0 + 256 * b1
    values = torch.nn.functional.embedding(index, _quad_table(tuple(code.tolist()))).view(-1)[:numel]
    scale = state.float_absmax()
    full = numel - numel % blocksize
    values[:full].view(-1, blocksize).mul_(scale[: full // blocksize, None])
    if full < numel:
        values[full:].mul_(scale[-1])
    return values.view(shape).to(dtype)


@dequantize_4bit_op.register_kernel("cuda")
def _(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype):
    return dequantize_4bit_cuda(
        packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype
    )


def dequantize_4bit_cuda(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
                         shape, dtype):
    """The CUDA kernel, callable without the op's dispatch (for other ops' CUDA kernels)."""
    if packed.numel() * packed.element_size() != (math.prod(shape) + 1) // 2:  # let the reference name the error
        state = _state(absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype)
        return dequantize_4bit_reference(packed, state, dtype)
    from .triton.dequantize import dequantize_4bit as triton_dequantize_4bit

    return triton_dequantize_4bit(
        packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype
    )


@functools.lru_cache(maxsize=8)
def _quad_table(code: tuple[float, ...]) -> torch.Tensor:
    """[65536, 4]: row b0 + 256 * b1 holds the values of the bytes b0, b1 (high nibble first)."""
    code = torch.tensor(code, dtype=torch.float32)
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # byte -> 2 values
    return torch.cat([pairs.repeat(256, 1), pairs.repeat_interleave(256, dim=0)], dim=1)


def _state(absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype):
    nested = None
    if nested_absmax is not None:
        nested = NestedState(nested_absmax, nested_code, nested_offset, nested_blocksize)
    return QuantState("", blocksize, torch.Size(shape), dtype, absmax, code, nested)


@dequantize_4bit_op.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


def state_args(state: QuantState) -> tuple:
    """The state as the ops take it: absmax, code, nested absmax/code/offset (or None),
    blocksize, nested blocksize (0 without double quantization), shape."""
    nested = state.nested
    return (
        state.absmax,
        state.code,
        nested.absmax if nested is not None else None,
        nested.code if nested is not None else None,
        nested.offset if nested is not None else None,
        state.blocksize,
        nested.blocksize if nested is not None else 0,
        list(state.shape),
    )


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight of ``state.shape`` in ``dtype`` (default: the original weight's dtype)."""
    dtype = dtype or state.dtype
    args = state_args(state)
    if packed.device.type == "cpu" and not torch.compiler.is_compiling() and _native_takes(packed, *args, dtype):
        # the op's first CPU kernel called directly: a training step asks ~400 times, and the
        # custom op's own dispatch costs ~30 us a call (a compiled graph keeps the op)
        return native.dequantize_4bit(packed, *args, dtype)
    return dequantize_4bit_op(packed, *args, dtype)
