"""The language-model head and its cross-entropy in one autograd node, chunk by chunk over the
tokens, so the full [tokens, vocabulary] logits never exist at once.

    z_t      = float32(h_t W^T)                   W: the head's weight [vocab, hidden], frozen
    loss     = - sum over t in T of  log_softmax(z_t)[y_t]         T: tokens whose label != ignore
    dL/dz_t  = softmax(z_t) - onehot(y_t)          (zero for t not in T)
    dL/dh_t  = dL/dz_t (cast to h's dtype) @ W     (zero for t not in T)

exactly what ``F.cross_entropy(F.linear(h, W).float(), y, reduction="sum")`` computes, with
the casts autograd makes there (the product in h's dtype, its gradient cast back before the
product with W). The reference keeps the bf16 logits, their float32 copy and the
log-softmax for backward: for SmolLM2's 49,152-entry vocabulary and 512 tokens about 250 MiB.
Here a chunk's logits live only while its loss and gradient are computed, in forward: what is
kept for backward is dL/dh, the size of h. Same multiplications (one product with W forward,
one backward), so no speed is given up for the memory; fewer where labels are ignored (a chat
prompt's tokens): those rows' logits are never computed, their loss and gradient being zero.
log_softmax with dtype=float32 reads the logits in h's dtype and sums in float32 in one op, as
F.cross_entropy's .float() then log_softmax does in two.

What it leaves out: a head that trains (W's gradient), a bias, and any transform between the
head and the loss (Gemma 2's logit soft-capping, a logit scale): the caller keeps the plain
path for those.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

CHUNK_VALUES = 1 << 22  # logits per chunk: 16 MiB of float32 (85 tokens of a 49,152-entry vocabulary)


def _chunk_loss(hidden, weight, targets, want_grad: bool):
    """Loss and dL/dh of rows that all count (no ignored target among them)."""
    logp = torch.log_softmax(F.linear(hidden, weight), dim=-1, dtype=torch.float32)  # reads h's dtype in place
    loss = -logp.gather(1, targets[:, None]).sum()
    if not want_grad:
        return loss, None
    grad = logp.exp_()  # softmax, in the log-softmax's storage
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1.0
    return loss, grad.to(hidden.dtype) @ weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk: int):
        kept = (targets != ignore_index).nonzero().squeeze(1)  # ignored rows: no loss, no gradient, no logits
        rows, wanted = hidden.index_select(0, kept), targets.index_select(0, kept)
        losses, grads = [hidden.new_zeros((), dtype=torch.float32)], []
        for start in range(0, len(kept), chunk):
            loss, grad = _chunk_loss(rows[start:start + chunk], weight, wanted[start:start + chunk],
                                     ctx.needs_input_grad[0])
            losses.append(loss)
            grads.append(grad)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(torch.cat(grads) if grads else rows, kept)
            ctx.tokens = hidden.shape[0]
        return torch.stack(losses).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_rows, kept = ctx.saved_tensors
        grad_hidden = grad_rows.new_zeros(ctx.tokens, grad_rows.shape[1])
        grad_hidden.index_copy_(0, kept, grad_rows * grad_loss.to(grad_rows.dtype))
        return grad_hidden, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight^T`` (logits in float32) against ``targets``,
    skipping ``ignore_index``. hidden: [..., h]; weight: [vocab, h], frozen; targets: [...]."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy keeps the head frozen: its weight must not require grad")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk or max(1, CHUNK_VALUES // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets.reshape(-1), ignore_index, chunk)
