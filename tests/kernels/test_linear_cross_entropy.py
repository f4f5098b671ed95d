"""The chunked head + cross-entropy node against float64 math and against the plain path
(F.linear, .float(), F.cross_entropy) whose casts it reproduces."""

import pytest
import torch
from torch.nn import functional as F

from fourbit.kernels.linear_cross_entropy import linear_cross_entropy


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
    # Same logits in h's dtype, same float32 softmax; the loss differs only by the order of its
    # sum over chunks. The gradient is cast to h's dtype before the scale here, after it there:
    # one rounding of h's dtype (bf16: 2^-8 relative) apart at most.
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
    import fourbit.kernels.linear_cross_entropy as lce

    rows = []
    real_linear = F.linear

    class Spy:
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def linear(x, w, *args):
            rows.append(x.shape[0])
            return real_linear(x, w, *args)

    monkeypatch.setattr(lce, "F", Spy())
    h, w, y = inputs(40, 32, 97, torch.float32, ignored=0.0)
    y[5:35] = -100
    loss = linear_cross_entropy(h, w, y, chunk=8)
    loss.backward()
    assert sum(rows) == 10
    ref_loss, ref_grad = float64_reference(h, w, y)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-4)  # as the float32 test above
    torch.testing.assert_close(h.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert not h.grad[5:35].any()
