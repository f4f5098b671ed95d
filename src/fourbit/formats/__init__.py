"""Quantization formats: one file each, one registry.

A format is what a checkpoint folder's ``config.json`` ``quantization_config`` names, and
everything fourbit does with it (formats/base.py, :class:`~fourbit.formats.base.Format`):

    detect(qconfig)        this format's settings from a checkpoint's quantization_config, or None
    layer(linear, ...)     the empty quantized layer that takes a linear's place while loading
    quantization_config()  what a folder of this format carries in its config.json

``stored_format(qconfig)`` asks each format in turn; a quantization_config no format claims is
refused by name. Adding a format is one file here and one entry in FORMATS.
"""

from __future__ import annotations

from ..errors import InputError
from .awq import AWQ
from .base import Format, StoredFormat
from .bnb4bit import BNB_4BIT
from .gptq import GPTQ
from .int8 import INT8

FORMATS: tuple[Format, ...] = (BNB_4BIT, INT8, GPTQ, AWQ)


def stored_format(qconfig: dict | None) -> StoredFormat | None:
    """The format (and its settings) a checkpoint's quantization_config declares; None for a
    dense checkpoint; a ValueError for one no format reads."""
    if not qconfig:
        return None
    for fmt in FORMATS:
        settings = fmt.detect(qconfig)
        if settings is not None:
            return StoredFormat(fmt, settings)
    raise InputError(
        f"checkpoint quantization {qconfig.get('quant_method')!r} is not supported by this loader; expected "
        "bitsandbytes 4-bit or 8-bit, GPTQ (v1 layout), AWQ (GEMM layout), or an unquantized checkpoint"
    )


__all__ = ["FORMATS", "Format", "StoredFormat", "stored_format", "AWQ", "BNB_4BIT", "GPTQ", "INT8"]
