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

On a CPU the two products read the head prepacked for oneDNN (kernels/prepacked_linear.py), W for
h W^T and W^T for dL/dz W, packed at the first step and kept while W is unchanged: F.linear
reorders the whole head at every call, and a step calls it twice per chunk. SmolLM2's head and
loss at 165 tokens a chunk: 1.4-1.5x faster in float32, 1.1x in bf16 (bench/RESULTS.md). The copies
cost memory, twice the head's bytes, so they are kept only while both fit ``PACKED_HEAD_BYTES``
(SmolLM2's head in float32: 2 x 108 MiB); a larger head (a large model's, whose head is a smaller
share of the step) takes F.linear, the twin the tests compare them with.

What it leaves out: a head that trains (W's gradient), a bias, and any transform between the
head and the loss (Gemma 2's logit soft-capping, a logit scale): the caller keeps the plain
path for those.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .prepacked_linear import is_prepacked, prepack, prepacked_linear

# A chunk's float32 logits stay under 32 MiB, the largest block glibc's malloc serves from its heap:
# a larger one is mapped fresh and its every page faulted in, at every call (~0.2 s a step for the
# full logits of 512 tokens, more in a VM that hands freed pages back to its host: bench/RESULTS.md).
# 31 MiB leaves room for the allocator's own header and alignment. SmolLM2's 49,152-entry
# vocabulary: 165 tokens a chunk. Fewer, larger products also run faster (the head's product at 85
# tokens a chunk ran at 0.8x the rate at 170, float32).
CHUNK_BYTES = 31 << 20


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk: as many as keep a chunk's float32 logits within ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // (4 * vocab))


PACKED_HEAD_BYTES = 256 << 20  # the most the two prepacked copies of a head may take together
_packed_heads = WeakIdKeyDictionary()  # head weight -> (what it was when packed, W packed, W^T packed)


def head_products(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The head as its two products read it, for ``prepacked_linear``: (W for h W^T, W^T for g W).
    Prepacked copies on a CPU while the weight is unchanged and both fit ``PACKED_HEAD_BYTES``,
    else W and its transposed view."""
    if weight.device.type != "cpu" or 2 * weight.nbytes > PACKED_HEAD_BYTES or torch.compiler.is_compiling():
        return weight, weight.T
    identity = (weight._version, weight.data_ptr(), weight.dtype, tuple(weight.shape))
    cached = _packed_heads.get(weight)
    if cached is None or cached[0] != identity:  # first use, or changed in place / replaced (.data, .to)
        packed = prepack(weight)
        if not is_prepacked(packed):  # oneDNN does not pack this dtype here (bf16 without native bf16)
            return weight, weight.T
        cached = _packed_heads[weight] = (identity, packed, prepack(weight.T))
    return cached[1], cached[2]


def _chunk_loss(hidden, head, targets, want_grad: bool):
    """Loss and dL/dh of rows that all count (no ignored target among them); head: ``head_products``."""
    weight, weight_t = head
    logp = torch.log_softmax(prepacked_linear(hidden, weight), dim=-1, dtype=torch.float32)  # reads h's dtype in place
    loss = -logp.gather(1, targets[:, None]).sum()
    if not want_grad:
        return loss, None
    grad = logp.exp_()  # softmax, in the log-softmax's storage
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1.0
    return loss, prepacked_linear(grad.to(hidden.dtype), weight_t)  # dL/dz W


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk: int):
        kept = (targets != ignore_index).nonzero().squeeze(1)  # ignored rows: no loss, no gradient, no logits
        rows, wanted = hidden.index_select(0, kept), targets.index_select(0, kept)
        losses, grads, head = [hidden.new_zeros((), dtype=torch.float32)], [], head_products(weight)
        for start in range(0, len(kept), chunk):
            loss, grad = _chunk_loss(rows[start:start + chunk], head, wanted[start:start + chunk],
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
    chunk = chunk or chunk_tokens(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets.reshape(-1), ignore_index, chunk)
