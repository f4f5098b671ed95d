"""The running batch's KV cache, left-padded, which rows join and leave between decode steps.

    keys, values   [rows, heads, length, head_dim] per layer (transformers' DynamicCache)
    mask           [rows, length]: 1 where a row has a token, 0 in its left padding

A row joining with a shorter history is padded on the left to the batch's length (or the batch
to its): zeros in the cache and 0 in the mask, so attention never reads them, and its positions
count its own tokens (mask.cumsum - 1), so it computes what it would alone. A row leaving is
dropped from the batch dimension, and columns that every remaining row pads are cut. Joining
copies the cache once per join, never per step.

Only full-attention layers can be padded like this: a sliding-window layer keeps just its last
tokens, so rows of different lengths no longer line up. :func:`joinable` tells; the engine then
starts rows only into an empty batch.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def joinable(cache: DynamicCache) -> bool:
    """Whether rows with other histories can join this cache (every layer full attention)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


class KVBatch:
    """Rows decoding together: their cache and attention mask, row i of each belonging to row i."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        self.cache, self.mask = cache, mask

    @classmethod
    def of_row(cls, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> KVBatch:
        """One row whose history is ``layers``: per layer, keys and values [1, heads, length, head_dim]."""
        return cls(DynamicCache(ddp_cache_data=layers),
                   torch.ones(1, layers[0][0].shape[2], dtype=torch.long, device=layers[0][0].device))

    @classmethod
    def stack(cls, batches: list[KVBatch | None]) -> KVBatch:
        """The rows of ``batches`` in order, left-padded to the longest; None: a row with no
        history yet (all padding). At least one must be a batch, all joinable."""
        given = [b for b in batches if b is not None]
        length = max(b.mask.shape[1] for b in given)
        empty = [(layer.keys[:1, :, :0], layer.values[:1, :, :0]) for layer in given[0].cache.layers]
        data = [(torch.cat([_left_pad(b.cache.layers[i].keys if b is not None else empty[i][0], length, 2) for b in batches]),
                 torch.cat([_left_pad(b.cache.layers[i].values if b is not None else empty[i][1], length, 2) for b in batches]))
                for i in range(len(empty))]
        masks = [b.mask if b is not None else given[0].mask.new_zeros(1, 0) for b in batches]
        return cls(DynamicCache(ddp_cache_data=data), torch.cat([_left_pad(m, length, 1) for m in masks]))

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def positions(self) -> torch.Tensor:
        """Each row's position for its next token: the tokens it has so far."""
        return self.mask.sum(1, keepdim=True)

    def grow(self) -> torch.Tensor:
        """The mask for one more token in every row (what the decode step's forward takes); it
        becomes this batch's mask, as the forward appends that token to the cache."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask

    def join(self, other: KVBatch) -> None:
        """Append ``other``'s rows after this batch's (both joinable)."""
        joined = KVBatch.stack([self, other])
        self.cache, self.mask = joined.cache, joined.mask

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into this batch, in order); cut the padding no row needs."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask[index]
        self.cache.batch_select_indices(index)
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else self.mask.shape[1]
        if first > 0 and joinable(self.cache):  # a sliding window's layers are shorter: left as they are
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)
