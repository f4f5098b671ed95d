"""CPU: packed 4-bit codes + (double-quantized) absmax -> dense weight, compiled by torch.compile.

    byte j of the packed weight holds values 2j (high nibble) and 2j+1 (low nibble)
    scale_b = code8[absmax_b] * nested_absmax[b // 256] + offset      (double quantization)
            = absmax_b                                                (otherwise)
    w_v     = float32(code4[nibble_v] * scale_{v // blocksize})  -> cast to the output dtype

the reference's formula (quant/four_bit.py), written once in torch and handed to
``torch.compile``. Inductor's CPU backend turns it into two C++ loops: one over the bytes that
looks up each byte's two values (a scalar loop: the table gather does not vectorize), and one
vectorized pass that decodes the scales, multiplies and casts to the output dtype; the eager
kernels make more passes and a float32 -> bf16 copy besides. Measured 2.6-4.5x faster than the
table kernel of kernels/dequantize.py (bench/bench_dequantize.py, bf16 out; bench/RESULTS.md,
issue 20, with the forms that measured slower); bitsandbytes' native kernel is 3-4.5x faster
still. The same float32 products in the same order: bit-identical to the reference (tests/kernels/test_cpu_dequantize.py).

When it is used (``supports``), and why not always:
- Compilation takes about a second per distinct (size, dtype, blocksize, double quantization),
  the first of a process about 3 s (25 s where Inductor's disk cache is empty), and
  Inductor specializes on sizes (its code for symbolic sizes measured several times slower),
  so only weights of at least MIN_VALUES values are compiled, the ones where the pass costs
  more than a call, and at most MAX_VARIANTS variants per process (torch._dynamo's own limit of
  recompiles per function is 8): a model has a handful of distinct linear sizes.
- It needs a C++ compiler at run time (Inductor's). Where compiling fails the failure is
  logged once and the table kernel serves every later call.
- ``FOURBIT_CPU_COMPILE=0`` turns it off (the table kernel then serves every call).
The blocks must be whole (numel a multiple of the blocksize); other weights take the table kernel.
"""

from __future__ import annotations

import functools
import logging
import os
import threading

import torch

from ...errors import InputError

log = logging.getLogger(__name__)

ENV = "FOURBIT_CPU_COMPILE"
MIN_VALUES = 1 << 16  # 64 Ki values (128 KiB of fp32 out): below that a call costs more than the pass
MAX_VARIANTS = 8  # torch._dynamo's default recompile_limit per function

_lock = threading.Lock()
_variants: set[tuple] = set()
_failed = False


def enabled() -> bool:
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise InputError(f"{ENV}={value!r}: expected 1 (compile the CPU kernels, the default) or 0 (don't)")
    return value == "1" and not _failed


def supports(numel: int, blocksize: int, nested: bool, dtype: torch.dtype) -> bool:
    """Whether this weight is dequantized by the compiled kernel (claiming a variant if new)."""
    if numel < MIN_VALUES or numel % blocksize or not enabled():
        return False
    key = (numel, blocksize, nested, dtype)
    with _lock:
        if key not in _variants and len(_variants) >= MAX_VARIANTS:
            return False
        _variants.add(key)
    return True


def _dequantize(packed, absmax, code, nested_absmax, nested_code, nested_offset,
                blocksize: int, nested_blocksize: int, dtype: torch.dtype):
    if nested_absmax is not None:
        blocks = torch.arange(absmax.numel(), device=absmax.device)
        scale = nested_code[absmax.long()] * nested_absmax[blocks // nested_blocksize] + nested_offset
    else:
        scale = absmax
    data = packed.reshape(-1)
    values = torch.stack([code[(data >> 4).long()], code[(data & 15).long()]], dim=-1)
    return (values.view(-1, blocksize) * scale[:, None]).view(-1).to(dtype)


@functools.cache
def _compiled():
    return torch.compile(_dequantize, dynamic=False)  # on first use: importing torch._dynamo takes a second


def dequantize_4bit(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
                    shape, dtype) -> torch.Tensor | None:
    """The dense weight of ``shape``; None where compiling failed (the caller then takes another kernel).
    Call only where :func:`supports` said yes."""
    global _failed
    data = packed.reshape(-1)
    if data.dtype != torch.uint8:  # FSDP's float storage holds the same bytes
        data = data.view(torch.uint8)
    try:
        with torch.no_grad():  # one variant for forward and backward (grad mode is part of torch.compile's guards)
            out = _compiled()(data, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
                            dtype)
    except Exception as e:  # Inductor's failures (no compiler, a compiler error) have many types
        _failed = True
        log.warning("fourbit: compiling the CPU dequantization kernel failed (%s: %s); using the uncompiled "
                    "kernel from now on", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    return out.view(shape)
