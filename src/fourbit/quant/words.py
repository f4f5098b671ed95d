"""Integer codes packed into int32 words, least significant first: the word is
sum_j value_j << (bits * j), stored as the signed int32 with the same 32 bits. The GPTQ (quant/gptq_layout.py)
and AWQ (quant/awq_layout.py) layouts both pack this way; they differ in which codes share a word."""

from __future__ import annotations

import torch


def pack_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., 32 / bits] codes (int64) -> [...] int32 words, value j at bits [bits*j, bits*j + bits)."""
    shifts = torch.arange(values.shape[-1], dtype=torch.int64, device=values.device) * bits
    words = (values << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed


def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [...] -> [..., 32 / bits] codes (int64)."""
    shifts = torch.arange(32 // bits, dtype=torch.int64, device=words.device) * bits
    return (words.to(torch.int64)[..., None] & 0xFFFFFFFF) >> shifts & (2**bits - 1)
