"""KV of prompt prefixes the engine has computed before, reused by the prompts that share them.

Chat requests repeat their beginning: the template's system prompt, a few-shot preamble, the
conversation so far. Their keys and values are the same whoever sends them (for the same weights
and adapter), so the engine keeps them, in blocks of ``block`` tokens:

    block i of a prompt   its tokens [i*block, (i+1)*block), keyed by (the key of block i-1, those tokens)
    stored                per layer, keys and values [kv_heads, block, head_dim] of those tokens

A block's key names every token before it (through its parent's key), so a hit means the
whole prefix matches, not only the block; keys are small integers chained with the block's
tokens, so nothing hashes a long prompt more than once. :meth:`lookup` walks a prompt's blocks
from the first while they are stored and returns their keys and values, at most all but the
last token of the prompt (that one's logits choose the first new token). The store holds at
most ``capacity`` tokens; the least recently used blocks go first, and a lookup touches a
prefix's blocks from its last to its first, so a parent is never older than its children.

A ``scope`` separates what different weights computed: the engine uses (adapter, its load
count), so an adapter's prefixes are never served to another, nor to a later adapter loaded
under the same name.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [kv_heads, tokens, head_dim]


@dataclass
class _Block:
    id: int
    scope: object
    layers: Layers


class PrefixCache:
    def __init__(self, capacity: int, block: int = 8):
        if capacity < 0 or block < 1:
            raise ValueError(f"capacity must be >= 0 and block >= 1 tokens, got {capacity} and {block}")
        self.capacity, self.block = capacity, block
        self._blocks: collections.OrderedDict[tuple, _Block] = collections.OrderedDict()  # least recently used first
        self._next_id = 1

    @property
    def tokens(self) -> int:
        return len(self._blocks) * self.block

    def lookup(self, scope: object, ids: list[int]) -> tuple[int, Layers | None]:
        """The longest stored prefix of ``ids`` (whole blocks, at most ``len(ids) - 1`` tokens):
        its length and per-layer keys and values [1, kv_heads, length, head_dim]; (0, None) if none."""
        walked = list(self._walk(scope, ids, (len(ids) - 1) // self.block))
        if not walked:
            return 0, None
        self._touch([key for key, _ in walked])
        found = [block for _, block in walked]
        layers = [(torch.cat([b.layers[i][0] for b in found], 1)[None], torch.cat([b.layers[i][1] for b in found], 1)[None])
                  for i in range(len(found[0].layers))]
        return len(found) * self.block, layers

    def store(self, scope: object, ids: list[int], layers: Layers) -> None:
        """Keep the whole blocks of ``ids``, whose per-layer keys and values [kv_heads, len(ids),
        head_dim] are ``layers`` (views are fine: each block is copied out)."""
        if self.capacity < self.block:
            return
        parent, keys = 0, []
        for start in range(0, len(ids) - self.block + 1, self.block):
            key = (scope, parent, tuple(ids[start:start + self.block]))
            block = self._blocks.get(key)
            if block is None:
                block = _Block(self._next_id, scope, [(k[:, start:start + self.block].clone(),
                                                       v[:, start:start + self.block].clone()) for k, v in layers])
                self._next_id += 1
                self._blocks[key] = block
            keys.append(key)
            parent = block.id
        self._touch(keys)
        while self.tokens > self.capacity:
            self._blocks.popitem(last=False)

    def drop(self, scope: object) -> None:
        """Forget every block computed in ``scope`` (its weights are gone)."""
        for key in [key for key, block in self._blocks.items() if block.scope == scope]:
            del self._blocks[key]

    def _touch(self, keys: list[tuple]) -> None:
        """Mark a prefix's blocks used, its last block first: parents stay younger than their children."""
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def _walk(self, scope: object, ids: list[int], blocks: int):
        parent = 0
        for start in range(0, blocks * self.block, self.block):
            key = (scope, parent, tuple(ids[start:start + self.block]))
            block = self._blocks.get(key)
            if block is None:
                return
            yield key, block
            parent = block.id
