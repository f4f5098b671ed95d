"""The 4-bit code tables (NF4, FP4, INT4) and the 8-bit dynamic map.

A 4-bit code is an index 0..15 into a table of 16 values in [-1, 1]; a block of weights is
stored as codes plus the block's absmax, and dequantizes to ``table[code] * absmax``.

NF4 (NormalFloat, QLoRA paper §3). Weights of a trained network are close to normal, so the
best 4-bit grid puts equal probability mass between neighbouring levels: levels at normal
quantiles. To have an exact zero the grid is asymmetric, 8 positive and 7 negative levels:

    positive: Phi^-1(linspace(offset, 1/2, 9)[:-1])     8 values, largest first
    negative: -Phi^-1(linspace(offset, 1/2, 8)[:-1])    7 values
    plus 0, sorted, divided by the largest,  offset = 0.9677083

(offset = mean of 1 - 1/(2*15) and 1 - 1/(2*16), so the extreme quantile stays finite). The
constants bitsandbytes ships were computed once with scipy; ``normal_float_map()`` re-derives
them and agrees to float32 rounding, but :data:`NF4` holds the shipped constants bit for bit,
because a checkpoint's bytes mean exactly those values.

FP4 is bitsandbytes' E2M1 float: bit 3 is the sign, bits 2-1 an exponent e, bit 0 a mantissa
m. Magnitude for e > 0 is ``2**(4 - e) * (1 + m/2)`` and the one subnormal (e = 0, m = 1) is
1/16, all divided by the largest (12). The table is indexed by bit pattern, so it is not
sorted, and index 8 is -0.

INT4 is the plain symmetric integer grid k/7, k = -7..7, that the QLoRA paper compares
against. It uses 15 of the 16 codes; code 15 (value 0) is never produced by the quantizer.

The dynamic map is bitsandbytes' 8-bit "dynamic tree" type used to store the absmax values
in double quantization (signed) and optimizer states (unsigned): for each decade
10^-6 .. 10^0 (i = 0..6) it holds 2^i linearly spaced fractions (signed) or 2^(i+1)
(unsigned) between 0.1 and 1, at bin midpoints, times that decade; then 0 and 1.0, sorted.
The fractions are computed in float32 as bitsandbytes does, so the map matches it exactly.
"""

from __future__ import annotations

import torch

from ..errors import InputError

QUANT_TYPES = ("nf4", "fp4", "int4")

# bitsandbytes' NF4 constants (functional.get_4bit_type / kernels.cu), index order 0..15.
NF4 = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

NF4_OFFSET = 0.9677083


def normal_float_map(offset: float = NF4_OFFSET) -> torch.Tensor:
    """NF4 derived from normal quantiles (see module docstring), float32, sorted."""
    quantile = torch.special.ndtri
    positive = quantile(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -quantile(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (values / values.max()).float()


def fp4_e2m1_map() -> torch.Tensor:
    """bitsandbytes' FP4 table in bit-pattern order (index = sign<<3 | e<<1 | m)."""
    magnitudes = []
    for bits in range(8):
        e, m = bits >> 1, bits & 1
        magnitudes.append(2.0 ** (4 - e) * (1 + m / 2) if e > 0 else m / 16)
    magnitudes = torch.tensor(magnitudes, dtype=torch.float64) / max(magnitudes)
    return torch.cat([magnitudes, -magnitudes]).float()


def int4_map() -> torch.Tensor:
    """Symmetric integer grid k/7, k = -7..7, in codes 0..14; code 15 is an unused 0."""
    levels = torch.arange(-7, 8, dtype=torch.float64) / 7
    return torch.cat([levels, torch.zeros(1, dtype=torch.float64)]).float()


FP4 = fp4_e2m1_map()
INT4 = int4_map()
_TABLES = {"nf4": NF4, "fp4": FP4, "int4": INT4}


def get_code(quant_type: str) -> torch.Tensor:
    """The 16-entry float32 table for ``quant_type`` (a fresh copy, safe to move or modify)."""
    check_quant_type(quant_type)
    return _TABLES[quant_type].clone()


def check_quant_type(quant_type: str) -> None:
    if quant_type not in _TABLES:
        raise InputError(f"unknown 4-bit quantization type {quant_type!r}; expected one of {QUANT_TYPES}")


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic tree map: 256 sorted float32 values in [-1, 1] (or [0, 1])."""
    values = []
    for i in range(7):  # decades 10^-6 .. 10^0
        n = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, n + 1)  # all float32, as bitsandbytes computes it
        level = 10.0 ** (i - 6) * ((edges[:-1] + edges[1:]) / 2)
        values += level.tolist()
        if signed:
            values += (-level).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)
