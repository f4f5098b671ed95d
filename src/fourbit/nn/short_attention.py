"""Attention for CPU training on short sequences: transformers' own SDPA attention, run by torch's
math backend where that is faster than its flash kernel.

    softmax(Q K^T * scaling + mask) V          (the function is SDPA's; only the kernel differs)

On a CPU torch's ``scaled_dot_product_attention`` picks its flash kernel, which works through
blocks of queries and keys. In bf16 its forward and backward cost about the same from 64 to 192
tokens a sequence (7-8 ms for 512 tokens in a layer of SmolLM2's shape, 9 heads of 64), where the
math backend (Q K^T, softmax and P V as whole products) takes 4.3 ms at 64 tokens, 5.7 at 128, as
much as flash at 192 and 1.1-1.2x longer from 256 on (bench/RESULTS.md, issue 20). In float32
flash is as fast or faster at every length. So for bf16 queries of at most ``MATH_MAX_TOKENS``
tokens, with gradients on (training), this runs transformers' ``sdpa_attention_forward``, masks,
grouped heads and all, inside ``sdpa_kernel(SDPBackend.MATH)``; everything else runs it as is.
The price is memory: the math backend keeps its float32 scores for backward, ~16 B heads T^2
bytes a layer (9 MiB a layer for SmolLM2 at 4 x 128 tokens, about as much as the rest of the
layer's activations; one layer's worth under gradient checkpointing). train/estimate.py counts it.

It plugs in through transformers' public extension points: the function is registered under
``NAME`` with ``AttentionInterface`` (and SDPA's mask builder with ``AttentionMaskInterface``),
and ``use_short_attention(model)`` switches a model whose attention is "sdpa" to it with
``set_attn_implementation``. The name is not written to saved configs.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "fourbit_sdpa"
MATH_MAX_TOKENS = 128  # the longest query the math backend takes (measured crossover ~160-190, bf16)


def takes_math(device_type: str, dtype: torch.dtype, tokens: int) -> bool:
    """Whether queries of ``tokens`` tokens in ``dtype`` on ``device_type`` run the math backend
    (in training; train/estimate.py counts its scores where it does)."""
    return device_type == "cpu" and dtype == torch.bfloat16 and tokens <= MATH_MAX_TOKENS


def short_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention; by torch's math backend for short bf16 queries in training."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if torch.is_grad_enabled() and takes_math(query.device.type, query.dtype, query.shape[2]):
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_short_attention(model) -> bool:
    """Switch a transformers model whose attention is "sdpa" to ``short_attention``; returns
    whether it did (other implementations, eager or flash, are left as they are)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, short_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
