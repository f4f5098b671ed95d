"""The language-model head and its cross-entropy in one autograd node, chunk by chunk over the
tokens, so the full [tokens, vocabulary] logits never exist at once.

    z_t      = float32(h_t W^T)                   W: the head's weight [vocab, hidden], frozen
    loss     = sum over t in T of  logsumexp(z_t) - z_t[y_t]      T: tokens whose label != ignore
    dL/dz_t  = softmax(z_t) - onehot(y_t)          (zero for t not in T)
    dL/dh_t  = dL/dz_t (cast to h's dtype) @ W

exactly what ``F.cross_entropy(F.linear(h, W).float(), y, reduction="sum")`` computes, with
the casts autograd makes there (the product in h's dtype, its gradient cast back before the
product with W). The reference keeps the bf16 logits, their float32 copy and the
log-softmax for backward: for SmolLM2's 49,152-entry vocabulary and 512 tokens about 250 MiB.
Here a chunk's logits live only while its loss and gradient are computed, in forward: what is
kept for backward is dL/dh, the size of h. Same multiplications (one product with W forward,
one backward), so no speed is given up for the memory.

What it leaves out: a head that trains (W's gradient), a bias, and any transform between the
head and the loss (Gemma 2's logit soft-capping, a logit scale): the caller keeps the plain
path for those.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

CHUNK_VALUES = 1 << 22  # logits per chunk: 16 MiB of float32 (85 tokens of a 49,152-entry vocabulary)


def _chunk_loss(hidden, weight, targets, ignore_index: int, want_grad: bool):
    logits = F.linear(hidden, weight).float()
    lse = torch.logsumexp(logits, dim=-1)
    kept = targets != ignore_index
    safe = torch.where(kept, targets, 0)
    picked = logits.gather(1, safe[:, None]).squeeze(1)
    loss = ((lse - picked) * kept).sum()
    if not want_grad:
        return loss, None
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' storage
    grad[torch.arange(len(safe), device=grad.device), safe] -= 1.0
    grad.mul_(kept[:, None])
    return loss, grad.to(hidden.dtype) @ weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk: int):
        losses, grads = [], []
        for start in range(0, hidden.shape[0], chunk):
            loss, grad = _chunk_loss(hidden[start:start + chunk], weight, targets[start:start + chunk], ignore_index,
                                     ctx.needs_input_grad[0])
            losses.append(loss)
            grads.append(grad)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(torch.cat(grads))
        return torch.stack(losses).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight^T`` (logits in float32) against ``targets``,
    skipping ``ignore_index``. hidden: [..., h]; weight: [vocab, h], frozen; targets: [...]."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy keeps the head frozen: its weight must not require grad")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk or max(1, CHUNK_VALUES // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets.reshape(-1), ignore_index, chunk)
