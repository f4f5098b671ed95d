"""Attention of one new token per row over its cached keys and values (decoding):

    out[r, h] = sum_t softmax_t(scale * q[r, h] . k[r, h // g, t]) v[r, h // g, t]

over the positions t that row r's mask keeps (its left padding is left out), with g query heads
per key/value head (grouped-query attention). On a CPU the native kernel (kernels/cpu/decode.c)
does it in float32 with one rounding of the output (bf16: 5-11x torch's bf16 attention at 70 to
2,000 cached positions; float32: 1.2-1.7x at 70, 0.87-1.07x at 300, 1.1-1.27x at 2,000; SmolLM2's 9 query and
3 key/value heads of 64, bench/bench_decode_step.py); elsewhere, and as its reference, torch's
scaled_dot_product_attention, as transformers' sdpa attention calls it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .cpu import native


def decode_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                               scale: float) -> torch.Tensor:
    padding = mask[:, None, None, :].bool() if mask is not None else None
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=padding, scale=scale,
                                         enable_gqa=keys.shape[1] != q.shape[1])
    return out[:, :, 0]


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """q [rows, q_heads, d], keys and values [rows, kv_heads, length, d], mask [rows, length]
    (1: a token, 0: padding) or None: out [rows, q_heads, d]."""
    if (not torch.is_grad_enabled() and q.is_contiguous() and keys.stride(-1) == 1 and values.stride(-1) == 1
            and native.supports_decode(q, keys, values)):
        return native.decode_attention(q, keys, values, mask, scale)
    return decode_attention_reference(q, keys, values, mask, scale)
