"""The training loss: summed next-token cross-entropy, the head fused into it where it can be.

    loss = sum over t with labels[t+1] != -100 of  -log softmax(h_t W^T)[labels[t+1]]

h: the decoder's last hidden states, W: the language-model head. Where the model is a plain
Hugging Face causal LM whose logits are ``lm_head(h)`` and nothing more (no soft-capping or
scale), with a frozen bias-free head, and it is called directly (not through DDP or FSDP, whose
forward must run for their hooks), the head and the loss are one chunked node
(kernels/linear_cross_entropy.py) and the full logits never exist; otherwise the model's own
forward computes the logits and F.cross_entropy the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.linear_cross_entropy import linear_cross_entropy
from ..nn.dense_linear import DenseLinear
from .data import IGNORE_INDEX

# Causal LMs whose forward computes lm_head(last hidden state) and nothing more (read in their
# transformers modeling files); Gemma 2 and 3 soft-cap their logits, Cohere and Granite scale them.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "phi3"})


def causal_lm_loss(model, batch: dict) -> torch.Tensor:
    """Summed next-token cross-entropy over the tokens whose label is not -100."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]
    head = fused_head(model)
    if head is not None:
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        return linear_cross_entropy(hidden[:, :-1], head.weight, targets, IGNORE_INDEX)
    logits = model(**inputs, use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def fused_head(model) -> nn.Linear | None:
    """The head to fuse into the loss, or None where the model's own forward must run."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or _is_sharded(model):
        return None
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    head = model.get_output_embeddings()
    if type(head) not in (nn.Linear, DenseLinear) or head.bias is not None or head.weight.requires_grad:
        return None
    return head


def _is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return isinstance(model, FSDPModule)
