"""Rotary position embeddings as Llama-family models apply them (transformers' rotate_half: the
two halves of head_dim form the pairs):

    x' = x * cos + rotate_half(x) * sin,   rotate_half([a, b]) = [-b, a]

cos and sin are the model's own (its rotary_emb at each row's position, scaling included). On a
CPU the native kernel (kernels/cpu/decode.c) rotates q and k in place in one call, rounding where
torch's ops round; the plain-torch form is its reference.
"""

from __future__ import annotations

import torch

from .cpu import native


def rotated_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rotate_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [rows, q_heads, d] and k [rows, k_heads, d] (one position per row) rotated by cos and sin
    [rows, d]: in place where the native kernel takes them, else new tensors; returns both."""
    if (not torch.is_grad_enabled() and q.is_contiguous() and k.is_contiguous()
            and native.supports_decode(q, k, cos, sin)):
        native.rotate_(q, k, cos, sin)
        return q, k
    cos, sin = cos[:, None], sin[:, None]
    return rotated_reference(q, cos, sin), rotated_reference(k, cos, sin)
