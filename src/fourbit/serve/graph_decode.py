"""Greedy decoding of one sequence with a static KV cache and the decode step compiled (a CUDA graph on a GPU).

At batch 1 on a GPU a decode step is a few hundred small kernels, and the Python around them
(input preparation, logits processing, a host sync per token to check for the end) takes as
long as the kernels themselves: on an H100 with an 8B Llama in NF4, transformers' generate with
a static cache and a compiled forward spends 13.3 ms a token for 6.6 ms of kernels
(bench/RESULTS.md). Here the host only queues work:

    prefill   the prompt, one forward, into a StaticCache sized for prompt + max_new_tokens
    step      (token, position) -> (argmax of the next-token logits, position + 1), compiled with
              torch.compile(mode="reduce-overhead", fullgraph=True): on CUDA one CUDA-graph
              replay; the token and the position never leave the device
    stop      the host reads the tokens made so far every ``check_every`` steps (one sync), so
              up to check_every - 1 tokens past an end-of-sequence id may be computed; they are
              dropped, and the result is the tokens before the first end-of-sequence id

It makes the tokens serve.generate's greedy path makes (tested); what it leaves out is the rest
of that loop: batches, sampling, stop strings, streaming.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import StaticCache

from ..errors import InputError
from .cache_keyword import cache_keyword


class GraphDecoder:
    """Greedy decoder for one model and sequences up to ``max_length`` tokens (prompt included)."""

    def __init__(self, model, max_length: int, compile: bool = True, check_every: int = 16):
        if max_length < 2:
            raise InputError(f"max_length must be at least 2 (a prompt token and a new one), got {max_length}")
        if check_every < 1:
            raise InputError(f"check_every must be a positive integer, got {check_every}")
        self.model, self.max_length, self.check_every = model, max_length, check_every
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        self._cache_keyword = cache_keyword(model)
        self.step = torch.compile(self._step, mode="reduce-overhead", fullgraph=True) if compile else self._step

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The next token after ``ids`` [1, n] at ``positions`` [1, n], the cache updated."""
        logits = self.model(input_ids=ids, position_ids=positions, cache_position=positions[0],
                            **{self._cache_keyword: self.cache}, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def _step(self, token: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward(token, position), position + 1

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, eos_ids: Iterable[int] = ()) -> list[int]:
        """The greedy continuation of ``prompt``: at most ``max_new_tokens`` ids, ending before
        the first id in ``eos_ids``."""
        if not prompt:
            raise InputError("the prompt needs at least one token")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
        if len(prompt) + max_new_tokens > self.max_length:
            raise InputError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds this "
                             f"decoder's max_length ({self.max_length}); build one with a larger max_length")
        device = next(self.model.parameters()).device
        stop_ids = set(eos_ids)
        eos = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        self.cache.reset()
        positions = torch.arange(len(prompt), device=device)[None]
        token = self._forward(torch.tensor([prompt], device=device), positions)
        position = positions[:, -1:] + 1
        out = torch.empty(max_new_tokens, dtype=torch.long, device=device)
        out[:1].copy_(token[0])
        made = 1
        while made < max_new_tokens:
            if made % self.check_every == 0 and torch.isin(out[:made], eos).any():
                break
            torch.compiler.cudagraph_mark_step_begin()
            token, position = (t.clone() for t in self.step(token, position))  # graph outputs are reused
            out[made:made + 1].copy_(token[0])
            made += 1
        tokens = out[:made].tolist()
        end = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
        return tokens[:end]
