"""Group-wise integer quantization of a weight [out, in]: the grid GPTQ, AWQ and round-to-nearest share.

Each output row is cut into groups of ``group_size`` input columns (``-1``: the whole row is one
group); each (row, group) gets a scale and an integer zero point, with maxq = 2^bits - 1:

    range  lo = min(min w, 0), hi = max(max w, 0)            (0 stays exactly representable)
    sym:   hi = max(|lo|, hi), lo = -hi if lo < 0;  scale = (hi - lo) / maxq,  zero = (maxq + 1) / 2
    asym:  scale = (hi - lo) / maxq,                zero = round(-lo / scale)
    q  = clamp(round(w / scale) + zero, 0, maxq)             the stored integer code
    w~ = scale * (q - zero)                                  what inference computes with

A row whose group is all zeros gets lo, hi = -1, 1 (any scale would do). This is GPTQ's
quantizer (IST-DASLab ``quant.py``; docs/formats.md §5), so codes from here pack into the
GPTQ and AWQ layouts as those tools write them. Round-to-nearest (:func:`quantize_rtn`) applies it
to the weight as is: the baseline GPTQ and AWQ must beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError

BITS = (2, 3, 4, 8)


@dataclass
class GroupQuant:
    """Integer codes and their grid: ``codes`` [out, in] (original column order), ``scales`` and
    ``zeros`` [out, groups], ``g_idx`` [in]: the group of each input column."""

    codes: torch.Tensor  # uint8
    scales: torch.Tensor  # float32
    zeros: torch.Tensor  # int32
    g_idx: torch.Tensor  # int32
    bits: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        index = self.g_idx.long()
        scales, zeros = self.scales[:, index], self.zeros[:, index].float()
        return (scales * (self.codes.float() - zeros)).to(dtype)


def check_grid(bits: int, group_size: int, in_features: int) -> None:
    if bits not in BITS:
        raise InputError(f"bits must be one of {BITS}, got {bits!r}")
    if group_size != -1 and (not isinstance(group_size, int) or group_size <= 0):
        raise InputError(f"group_size must be a positive integer or -1 (one group per row), got {group_size!r}")
    if group_size != -1 and in_features % group_size:
        raise InputError(f"group_size {group_size} does not divide the input dimension {in_features}; "
                         f"use a divisor of {in_features} or -1 (one group per row)")


def grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) [rows] for the columns of ``w`` [rows, cols], float32."""
    maxq = 2**bits - 1
    w = w.float()
    lo = torch.minimum(w.min(dim=1).values, torch.zeros(()))
    hi = torch.maximum(w.max(dim=1).values, torch.zeros(()))
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-lo / scale)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` [rows, ...] on the rows' grids (scale, zero [rows])."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.clamp(torch.round(w.float() / scale.view(shape)) + zero.view(shape), 0, 2**bits - 1)


def quantize_rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True) -> GroupQuant:
    """Round-to-nearest: every group on its own grid, no error compensation."""
    out_features, in_features = weight.shape
    check_grid(bits, group_size, in_features)
    size = in_features if group_size == -1 else group_size
    groups = weight.float().reshape(out_features * (in_features // size), size)
    scale, zero = grid(groups, bits, sym)
    codes = quantize(groups, scale, zero, bits)
    n = in_features // size
    return GroupQuant(
        codes.reshape(out_features, in_features).to(torch.uint8), scale.view(out_features, n),
        zero.view(out_features, n).to(torch.int32),
        (torch.arange(in_features, device=weight.device) // size).to(torch.int32), bits,
    )
