"""Perplexity of a causal LM on a text, with a sliding window.

    windows of ``context`` tokens start every ``stride`` tokens; each window scores only the
    tokens no earlier window scored, so no token is counted twice; a token is predicted from
    the tokens before it in its window (with stride < context every token after the first is
    scored, with at least ``context - stride`` tokens of context after the first window; with
    stride = context each window's first token has none and is left out);
    ppl = exp( sum of the scored tokens' negative log-likelihoods / number of scored tokens )

A smaller stride gives each scored token more context (closer to the model's true perplexity)
at the cost of more forward passes; stride = context scores each window on its own. The mean is
over tokens, not windows (a short last window weighs what its tokens weigh).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError


@dataclass
class Perplexity:
    perplexity: float
    tokens: int  # tokens scored
    context: int
    stride: int

    def format(self) -> str:
        return (f"perplexity {self.perplexity:.4f} over {self.tokens} tokens "
                f"(context {self.context}, stride {self.stride})")


@torch.no_grad()
def perplexity(model, ids: list[int] | torch.Tensor, context: int = 512, stride: int | None = None) -> Perplexity:
    """Sliding-window perplexity of ``model`` on the token ids ``ids``."""
    stride = stride or max(1, context // 2)
    if context < 2 or not 1 <= stride <= context:
        raise InputError(f"need context >= 2 and 1 <= stride <= context, got context={context}, stride={stride}")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise InputError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    device = next(model.parameters()).device
    total, scored, done = 0.0, 0, 1  # done: tokens [0, done) are scored or are the unscorable first one
    for begin in range(0, ids.numel() - 1, stride):
        end = min(begin + context, ids.numel())
        if end <= done:
            continue
        window = ids[begin:end].to(device)[None]
        logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
        targets = window[0, 1:]
        first = max(0, done - begin - 1)  # position in targets of the first token not yet scored
        nll = torch.nn.functional.cross_entropy(logits[first:], targets[first:], reduction="sum")
        total += nll.item()
        scored += targets.numel() - first
        done = end
        if end == ids.numel():
            break
    return Perplexity(math.exp(total / scored), scored, context, stride)


def read_text_tokens(tokenizer, path: str | os.PathLike) -> list[int]:
    """A text file's tokens (``.txt``; ``.jsonl`` rows' ``text`` fields joined by the EOS token)."""
    from .io.datasets import load_rows

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perplexity file {path} does not exist")
    if path.suffix == ".jsonl":
        rows = load_rows(path)
        lacking = next((i for i, row in enumerate(rows, start=1) if not isinstance(row.get("text"), str)), None)
        if lacking is not None:
            raise InputError(f"perplexity file {path}: row {lacking} has no 'text' string")
        text = (tokenizer.eos_token or "\n").join(row["text"] for row in rows)
    elif path.suffix == ".txt":
        text = path.read_text()
    else:
        raise InputError(f"perplexity file {path}: expected .txt, or .jsonl with a 'text' field per row")
    return tokenizer(text, add_special_tokens=False)["input_ids"]
