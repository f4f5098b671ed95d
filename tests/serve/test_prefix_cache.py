"""The prefix cache: which stored blocks a prompt may reuse, and what it gets back.

The stored values are random tensors tagged by token position, so a lookup's result is checked
against the very slices that were stored (no model needed)."""

import pytest
import torch

from fourbit.serve.prefix_cache import PrefixCache

LAYERS, HEADS, DIM = 2, 3, 4


def kv(ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, keys and values [heads, len(ids), dim] that depend on the token and its position."""
    def one(layer, part):
        return torch.stack([torch.full((HEADS, DIM), 1000.0 * layer + 100.0 * part + 10.0 * i + t)
                            for i, t in enumerate(ids)], dim=1)
    return [(one(layer, 0), one(layer, 1)) for layer in range(LAYERS)]


def test_a_prompt_gets_the_whole_blocks_it_shares_with_a_stored_one_and_their_values():
    cache = PrefixCache(capacity=64, block=4)
    stored = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # blocks [1..4], [5..8]; 9, 10 are no whole block
    cache.store("base", stored, kv(stored))
    asked = [1, 2, 3, 4, 5, 6, 7, 8, 99]
    length, layers = cache.lookup("base", asked)
    assert length == 8
    want = kv(stored)
    for (k, v), (wk, wv) in zip(layers, want, strict=True):
        assert k.shape == (1, HEADS, 8, DIM)
        assert torch.equal(k[0], wk[:, :8]) and torch.equal(v[0], wv[:, :8])
    assert cache.lookup("base", [1, 2, 3, 4, 5, 6, 0, 8, 9])[0] == 4  # differs inside the second block
    assert cache.lookup("base", [0, 2, 3, 4, 5, 6, 7, 8, 9])[0] == 0  # the first block differs: nothing,
    # even though the second block's tokens are the same (a block's key names all tokens before it)


def test_the_last_token_of_a_prompt_is_never_reused_and_scopes_are_apart():
    cache = PrefixCache(capacity=64, block=4)
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    cache.store("a", ids, kv(ids))
    assert cache.lookup("a", ids)[0] == 4  # the 8th token's logits choose the first new token
    assert cache.lookup("a", ids + [9])[0] == 8
    assert cache.lookup("b", ids + [9]) == (0, None)  # computed with other weights
    cache.drop("a")
    assert cache.lookup("a", ids + [9]) == (0, None) and cache.tokens == 0


def test_capacity_drops_the_least_recently_used_blocks_children_before_parents():
    cache = PrefixCache(capacity=12, block=4)  # three blocks
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9, 8, 8, 8, 8]
    cache.store("s", a, kv(a))
    cache.store("s", b, kv(b))  # four blocks: one goes, a's second (a child, older than its parent)
    assert cache.tokens == 12
    assert cache.lookup("s", a + [0])[0] == 4 and cache.lookup("s", b + [0])[0] == 8
    cache.lookup("s", a + [0])  # a's first block is now the most recent
    c = [7, 7, 7, 7]
    cache.store("s", c, kv(c))  # b's second block goes (least recently used), then nothing else
    assert cache.lookup("s", a + [0])[0] == 4 and cache.lookup("s", b + [0])[0] == 4
    assert cache.lookup("s", c + [0])[0] == 4


def test_nothing_is_kept_with_no_capacity_and_bad_sizes_are_refused():
    cache = PrefixCache(capacity=0, block=4)
    cache.store("s", [1, 2, 3, 4, 5], kv([1, 2, 3, 4, 5]))
    assert cache.tokens == 0
    with pytest.raises(ValueError, match="capacity"):
        PrefixCache(capacity=-1)
