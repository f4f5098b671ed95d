"""Held-out exact-match accuracy: greedy answers to each conversation's last question.

For each conversation the prompt is every message before the final assistant turn, rendered
with the chat template and its generation prompt; the model answers greedily (batched, left
padded so every row's answer starts at the same column) and the answer is compared with the
reference by :func:`exact_match` (whitespace, case and trailing punctuation ignored).
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict

import torch

from ..chat_templates import pad_id
from ..nn.linear4bit import dense_weights


def exact_match_accuracy(
    model, tokenizer, conversations: list[list[dict]], skills: list[str] | None = None,
    max_new_tokens: int = 24, batch_size: int = 16, dense_cache: bool | None = None,
) -> dict:
    """Accuracy (and per-skill accuracy when ``skills`` is given) of greedy answers; ``answers``
    holds every answer, in order.

    dense_cache: dequantize the 4-bit weights once for the whole evaluation instead of at every
    decoding step (default: on CPUs, where that dequantization dominates decoding).
    """
    answers = greedy_answers(model, tokenizer, conversations, max_new_tokens, batch_size, dense_cache)
    return score_answers(answers, conversations, skills)


@torch.no_grad()
def greedy_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 24,
                   batch_size: int = 16, dense_cache: bool | None = None) -> list[str]:
    """The model's greedy answer to each conversation's last question, in order."""
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    answers = []
    if dense_cache is None:
        dense_cache = device.type == "cpu"
    try:
        with dense_weights(model) if dense_cache else contextlib.nullcontext():
            for start in range(0, len(conversations), batch_size):
                chunk = conversations[start : start + batch_size]
                prompts = [tokenizer.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in chunk]
                inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id, use_cache=True,
                )
                answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def score_answers(answers: list[str], conversations: list[list[dict]], skills: list[str] | None = None) -> dict:
    """Exact match of each answer against its conversation's final assistant turn."""
    correct = [exact_match(a, c[-1]["content"]) for a, c in zip(answers, conversations)]
    result = {"accuracy": sum(correct) / max(len(correct), 1), "correct": sum(correct), "total": len(correct),
              "examples": [{"answer": a, "reference": c[-1]["content"]} for a, c in zip(answers[:5], conversations)],
              "answers": answers}
    if skills:
        by_skill = defaultdict(list)
        for skill, ok in zip(skills, correct):
            by_skill[skill].append(ok)
        result["by_skill"] = {s: sum(v) / len(v) for s, v in sorted(by_skill.items())}
    return result


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after collapsing whitespace, ignoring case, and dropping trailing punctuation."""
    return _normalize(prediction) == _normalize(reference)


def _normalize(text: str) -> str:
    return re.sub(r"[\s.,;:!?]+$", "", " ".join(text.split()).casefold())
