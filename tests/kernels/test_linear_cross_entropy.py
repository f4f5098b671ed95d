"""The chunked head + cross-entropy node against float64 math and against the plain path
(F.linear, .float(), F.cross_entropy) whose casts it reproduces."""

import pytest
import torch
from torch.nn import functional as F

from fourbit.kernels import linear_cross_entropy as lce
from fourbit.kernels.linear_cross_entropy import linear_cross_entropy
from fourbit.kernels.prepacked_linear import is_prepacked


def inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, ignored: float = 0.3):
    h = torch.randn(tokens, hidden).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden) / hidden**0.5).to(dtype)
    y = torch.randint(0, vocab, (tokens,))
    y[torch.rand(tokens) < ignored] = -100
    return h, w, y


def float64_reference(h, w, y):
    h64 = h.detach().double().requires_grad_()
    logits = h64 @ w.double().T
    loss = F.cross_entropy(logits, y, ignore_index=-100, reduction="sum")
    loss.backward()
    return loss.detach(), h64.grad


# Odd token counts and chunk sizes that do not divide them (chunk 7 over 37 tokens: a last chunk of 2).
@pytest.mark.parametrize("tokens,chunk", [(37, 7), (37, None), (1, 3), (64, 64)])
def test_float32_matches_float64_math(tokens, chunk):
    h, w, y = inputs(tokens, 48, 301, torch.float32)
    loss = linear_cross_entropy(h, w, y, chunk=chunk)
    loss.backward()
    ref_loss, ref_grad = float64_reference(h, w, y)
    # float32 logits of a 48-term dot product and a 301-way softmax: ~1e-6 relative rounding
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_plain_path_with_its_casts(dtype):
    h, w, y = inputs(45, 64, 500, dtype)
    h2 = h.detach().clone().requires_grad_()
    loss = linear_cross_entropy(h, w, y, chunk=16)
    (loss * 0.5).backward()  # a scaled loss, as training divides by the token count
    plain = F.cross_entropy(F.linear(h2, w).float(), y, ignore_index=-100, reduction="sum")
    (plain * 0.5).backward()
    # Same logits in h's dtype up to the order of the products' float32 sums (on a CPU the node
    # reads the head prepacked for oneDNN, F.linear may take MKL: ~1e-7 relative), same float32
    # softmax; the loss differs by that and the order of its sum over chunks. The gradient is cast
    # to h's dtype before the scale here, after it there: one rounding of h's dtype (bf16: 2^-8
    # relative) apart at most.
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-4)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.bfloat16: dict(rtol=2**-7, atol=1e-4)}[dtype]
    torch.testing.assert_close(h.grad, h2.grad, **tol)


def test_all_tokens_ignored_gives_zero_loss_and_gradient():
    h, w, y = inputs(10, 16, 50, torch.float32, ignored=1.0)
    loss = linear_cross_entropy(h, w, y, chunk=4)
    loss.backward()
    assert loss.item() == 0 and not h.grad.any()


def test_without_grad_only_the_loss_is_computed():
    h, w, y = inputs(20, 16, 50, torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, chunk=6)
    torch.testing.assert_close(loss.double(), float64_reference(h, w, y)[0], rtol=1e-5, atol=1e-4)


def test_a_trainable_head_is_refused():
    h, w, y = inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="weight must not require grad"):
        linear_cross_entropy(h, w.requires_grad_(), y)


def test_ignored_tokens_get_no_logits(monkeypatch):
    # A chat prompt's tokens carry the ignore label: their loss and gradient are zero, so their
    # logits (a [tokens, vocab] product each) are never computed
    rows = []
    real = lce.prepacked_linear

    def spy(x, w, *args):
        if x.shape[1] == 32:  # the hidden size: h W^T (the other product, dL/dz W, reads the vocabulary)
            rows.append(x.shape[0])
        return real(x, w, *args)

    monkeypatch.setattr(lce, "prepacked_linear", spy)
    h, w, y = inputs(40, 32, 97, torch.float32, ignored=0.0)
    y[5:35] = -100
    loss = linear_cross_entropy(h, w, y, chunk=8)
    loss.backward()
    assert sum(rows) == 10
    ref_loss, ref_grad = float64_reference(h, w, y)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-4)  # as the float32 test above
    torch.testing.assert_close(h.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert not h.grad[5:35].any()


def test_chunks_keep_float32_logits_under_the_heap_ceiling():
    # glibc serves blocks under 32 MiB from its heap; a chunk's float32 logits must stay below
    for vocab in (97, 49_152, 151_936, 262_144):
        rows = lce.chunk_tokens(vocab)
        assert rows >= 1 and rows * vocab * 4 < 32 << 20
    assert lce.chunk_tokens(49_152) == 165
    assert lce.chunk_tokens(10**9) == 1  # a vocabulary past the ceiling: one token at a time


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_head_matches_float64_math_and_the_plain_products(dtype, monkeypatch):
    h, w, y = inputs(70, 64, 700, dtype)
    forward, backward = lce.head_products(w)
    # oneDNN packs float32 everywhere, bf16 where the CPU computes it natively; elsewhere the plain
    # products run and this test checks them only
    packs = is_prepacked(forward)
    assert packs == is_prepacked(backward)
    if dtype == torch.float32:
        assert packs, "float32 heads are prepacked on a CPU"
    loss = linear_cross_entropy(h, w, y, chunk=16)
    loss.backward()

    monkeypatch.setattr(lce, "PACKED_HEAD_BYTES", 0)  # the plain products: F.linear, the twin
    assert not is_prepacked(lce.head_products(w)[0])
    h2 = h.detach().clone().requires_grad_()
    plain = linear_cross_entropy(h2, w, y, chunk=16)
    plain.backward()
    ref_loss, ref_grad = float64_reference(h, w, y)
    if dtype == torch.float32:  # float32 sums of 64 terms, a 700-way softmax: ~1e-6 relative
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(h.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-7)
    else:
        # bf16 logits (8-bit mantissa): each product rounds its float32 sums to bf16, ~2^-9 relative
        # on logits of about 1. Against float64 math: the loss, a sum of 49 log-softmax terms whose
        # rounding errors partly cancel, within a few hundredths (0.012 seen over five seeds); dL/dh is
        # rounded to bf16 once more (2^-8 relative). The twin (F.linear also goes to oneDNN in bf16
        # here) may order its sums otherwise on another build: the same bounds.
        torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=0.05)
        torch.testing.assert_close(h.grad.double(), ref_grad, rtol=2**-7, atol=2e-3)
        torch.testing.assert_close(loss, plain, rtol=0, atol=0.05)
        torch.testing.assert_close(h.grad, h2.grad, rtol=2**-7, atol=2e-3)


def test_prepacked_head_follows_a_changed_weight():
    h, w, y = inputs(30, 48, 301, torch.float32)
    linear_cross_entropy(h, w, y).backward()
    packed = lce.head_products(w)[0]
    with torch.no_grad():
        w.mul_(-1.5)  # in place: the packed copy is stale
    assert lce.head_products(w)[0] is not packed
    h.grad = None
    loss = linear_cross_entropy(h, w, y)
    loss.backward()
    ref_loss, ref_grad = float64_reference(h, w, y)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-4)  # as the float32 test above
    torch.testing.assert_close(h.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    packed = lce.head_products(w)[0]
    w.data = w.data * 2  # replaced, as module.to() replaces a parameter's data
    assert lce.head_products(w)[0] is not packed
    torch.testing.assert_close(linear_cross_entropy(h, w, y).double(), float64_reference(h, w, y)[0],
                               rtol=1e-5, atol=1e-4)


def test_a_head_over_the_budget_is_not_packed_and_the_cache_lets_go(monkeypatch):
    import gc
    import weakref

    h, w, y = inputs(8, 16, 64, torch.float32)
    monkeypatch.setattr(lce, "PACKED_HEAD_BYTES", 2 * w.nbytes - 1)  # one byte short of both copies
    forward, backward = lce.head_products(w)
    assert forward is w and backward.data_ptr() == w.data_ptr() and w not in lce._packed_heads
    monkeypatch.setattr(lce, "PACKED_HEAD_BYTES", 2 * w.nbytes)
    lce.head_products(w)
    assert w in lce._packed_heads
    alive = weakref.ref(w)
    del w, forward, backward
    gc.collect()
    assert alive() is None  # the cache holds the head weakly: dropping the model frees it
