"""Instruction data for training: conversations (read by io/datasets.py) -> token ids with a
response-only loss -> packed rows -> batches.

**Tokens and labels.** ``encode_conversation`` renders with ``tokenizer.apply_chat_template``
and finds the responses by rendering prefixes: for assistant turn ``i``,
``render(messages[:i], add_generation_prompt=True)`` ends where the response starts and
``render(messages[:i+1])`` ends after it. Both must be text prefixes of the whole render (an
error otherwise: such a template rewrites earlier turns, so responses cannot be located). The
text is then tokenized piece by piece, prompt, response, prompt, ..., without adding special
tokens (the template writes its own BOS, as transformers assumes). Piecewise, because BPE is
not prefix-stable at such a cut: SmolLM2 tokenizes a final "\\n\\n" as one token but
"\\n\\nHello" as "\\n", "\\n", "Hello", so the tokens of the whole text need not start with
the tokens of the prompt; tokenizing the prompt alone is also exactly what generation does. The
trained span runs from the response's first token through the last EOS token inside it (the
end-of-turn token that teaches the model to stop); whatever the template writes after it (a
newline for ChatML) and every system/user token and assistant header is ``-100``. With
``train_on_prompt`` every token is trained. Rows longer than ``cutoff_len`` lose their tail; a
row whose prompt (the tokens before the first response token) leaves no room for a response
token is an error, never a silent drop. What the cut costs is counted (:class:`Truncation`):
answers that lose tokens, and their final end-of-turn token (without which the model does not
learn to stop); when most examples lose it, training refuses to start unless
``allow_truncated_answers`` is set, and any loss is reported. Labels are not shifted: transformers' causal-LM loss
compares ``logits[t]`` with ``labels[t+1]``, so ``labels[0]`` is never used.

**Packing.** ``pack`` puts examples first-fit into rows of at most ``max_len`` tokens, with
``position_ids`` restarting at 0 for each example and the first label of each example set to
``-100`` (it would be predicted from the previous example's last token). What transformers
(5.x) Llama does with such rows, checked in tests/train/test_data.py: when the forward gets
``position_ids`` and **no** ``attention_mask`` and **no** cache, ``create_causal_mask`` finds
the restarts in ``position_ids`` and builds a block-diagonal causal mask (eager and sdpa), so
each example attends only to itself and its logits equal those of the example run alone. With
an ``attention_mask``, or with ``use_cache`` left at the config's default ``True`` (a cache is
then created even in training), examples are **not** isolated: position_ids only move RoPE and
every token attends to the earlier examples in its row. Hence ``collate`` returns no
``attention_mask`` for packed rows, and the forward must be
``model(**batch, use_cache=False)``.

**Batches.** ``collate`` right-pads; padding is ``-100`` in labels and 0 in ``attention_mask``
(padding is located by length, so a pad id equal to EOS, as in SmolLM2, is harmless). In a
packed batch the padding gets its own positions 0, 1, ... and so forms a separate segment.
``batches(n, batch_size, seed, epoch)`` is a pure function of ``(seed, epoch)``: a permutation
from ``numpy.random.default_rng([seed, epoch])`` cut into consecutive batches, so a run resumed
at ``(epoch, step)`` with ``start_step=step`` sees exactly the batches it would have seen.

**Held out.** ``val_size`` takes examples out of training for the eval loss (LLaMA-Factory's
meaning: a fraction of the dataset, rounded up, or a count): ``split_held_out`` draws them from
``seed`` alone, before packing, so every rank and every resumed run holds out the same ones and
the epochs' orders run over the rest.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..io.datasets import DatasetFormat, detect_format, to_messages

IGNORE_INDEX = -100


@dataclass
class Truncation:
    """What cutoff_len cut from a dataset's answers."""

    examples: int = 0
    answers_cut: int = 0  # examples whose answer lost tokens
    end_lost: int = 0  # examples whose final end-of-turn token was cut
    answer_tokens: int = 0  # trained tokens before the cut
    kept_tokens: int = 0  # and after it
    longest: int = 0  # the longest example, in tokens: the cutoff_len that cuts nothing

    def add(self, length: int, answer_positions: list[int], cutoff_len: int) -> None:
        kept = sum(position < cutoff_len for position in answer_positions)
        self.examples += 1
        self.answers_cut += kept < len(answer_positions)
        self.end_lost += answer_positions[-1] >= cutoff_len
        self.answer_tokens += len(answer_positions)
        self.kept_tokens += kept
        self.longest = max(self.longest, length)

    def merge(self, other: Truncation) -> None:
        """Add the counts of another part of the dataset."""
        self.examples += other.examples
        self.answers_cut += other.answers_cut
        self.end_lost += other.end_lost
        self.answer_tokens += other.answer_tokens
        self.kept_tokens += other.kept_tokens
        self.longest = max(self.longest, other.longest)

    def summary(self, cutoff_len: int) -> str:
        return (f"cutoff_len {cutoff_len} cuts the answers of {self.answers_cut} of {self.examples} examples "
                f"({self.kept_tokens} of {self.answer_tokens} answer tokens are trained; {self.end_lost} examples "
                f"lose their final end-of-turn token, so the model does not learn to stop there); the longest "
                f"example has {self.longest} tokens")

    def check(self, cutoff_len: int, allow: bool) -> str | None:
        """Refuse training that cannot learn (most examples lose their end of turn) unless
        ``allow``; else a warning to print when anything was cut, or None."""
        if self.end_lost * 2 > self.examples and not allow:
            raise InputError(f"{self.summary(cutoff_len)}: raise cutoff_len (to {self.longest} to keep every "
                             "answer whole), or set allow_truncated_answers: true to train anyway")
        return self.summary(cutoff_len) if self.answers_cut else None


def encode_conversation(tokenizer, messages: Sequence[Mapping], cutoff_len: int,
                        train_on_prompt: bool = False, *, index: int | None = None,
                        truncation: Truncation | None = None) -> dict:
    """``{"input_ids", "labels"}`` for one conversation; see the module docstring for the rules.
    ``truncation``, when given, counts what the cut costs this conversation's answers."""
    where = f"row {index}: " if index is not None else ""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise InputError(f"{where}conversation has no assistant turn, so nothing to train on")
    text = _render(tokenizer, messages, False)
    input_ids: list[int] = []
    labels: list[int] = []
    done = 0  # characters of ``text`` tokenized so far
    for i in turns:
        start = _prefix_end(text, _render(tokenizer, messages[:i], True), done, where, i)
        end = _prefix_end(text, _render(tokenizer, messages[: i + 1], False), start, where, i + 1)
        prompt, response = _encode(tokenizer, text[done:start]), _encode(tokenizer, text[start:end])
        closing = [k for k, token in enumerate(response) if token == tokenizer.eos_token_id]
        if not closing:
            raise InputError(
                f"{where}the chat template does not end assistant turn {i} with the EOS token "
                f"{tokenizer.eos_token!r}, so the model could not learn to stop; set a template "
                "that does (template: chatml, llama3 or alpaca)")
        trained = closing[-1] + 1
        input_ids += prompt + response
        labels += [IGNORE_INDEX] * len(prompt) + response[:trained]
        labels += [IGNORE_INDEX] * (len(response) - trained)
        done = end
    tail = _encode(tokenizer, text[done:])
    input_ids += tail
    labels += [IGNORE_INDEX] * len(tail)
    prompt_len = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
    if prompt_len >= cutoff_len:
        raise InputError(f"{where}prompt of {prompt_len} tokens does not fit in cutoff_len "
                         f"{cutoff_len} with room for a response; raise cutoff_len or shorten it")
    if truncation is not None:
        truncation.add(len(input_ids), [k for k, label in enumerate(labels) if label != IGNORE_INDEX], cutoff_len)
    if train_on_prompt:
        labels = list(input_ids)
    input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise InputError(f"{where}no trainable token left after truncation to {cutoff_len}")
    return {"input_ids": input_ids, "labels": labels}


# preprocessing_num_workers: each worker takes at least this many conversations, about half a
# second's tokenizing (bench/bench_tokenize.py: ~0.6 ms a conversation), so that starting it and
# sending its part and its examples across cost a small share.
MIN_ROWS_PER_WORKER = 1000


def encode_dataset(tokenizer, rows_or_messages: Sequence, cutoff_len: int,
                   train_on_prompt: bool = False, fmt: str | DatasetFormat | None = None,
                   truncation: Truncation | None = None, workers: int | None = None) -> list[dict]:
    """Encode raw rows (format detected unless ``fmt``) or conversations; errors name the row;
    ``truncation`` counts what cutoff_len cut. With ``workers`` (preprocessing_num_workers) a
    large dataset is tokenized in that many processes (at most one per CPU and per
    MIN_ROWS_PER_WORKER conversations), in contiguous parts: the same examples, in the same order,
    as in one process."""
    items = list(rows_or_messages)
    if not items:
        raise InputError("dataset has no rows")
    if isinstance(items[0], Mapping):
        fmt = fmt or detect_format(items)
        items = [to_messages(row, fmt, index) for index, row in enumerate(items)]
    workers = min(workers or 1, len(items) // MIN_ROWS_PER_WORKER, os.cpu_count() or 1)
    if workers <= 1:
        return _encode_part(tokenizer, items, 0, cutoff_len, train_on_prompt, truncation)[0]
    bounds = np.linspace(0, len(items), workers + 1).astype(int).tolist()
    # fork, as datasets.map does: a worker starts in milliseconds with the tokenizer already in
    # memory (forkserver's or spawn's import of torch, ~3 s a worker, outweighed the gain). The
    # workers only tokenize: no torch op, no OpenMP, so the parent's threads are not missed there.
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        parts = [pool.submit(_encode_part, tokenizer, items[start:end], start, cutoff_len, train_on_prompt,
                             Truncation()) for start, end in zip(bounds[:-1], bounds[1:])]
        results = [part.result() for part in parts]  # in order; a worker's InputError (naming its row) is raised here
    examples = []
    for encoded, counted in results:
        examples += encoded
        if truncation is not None:
            truncation.merge(counted)
    return examples


def _encode_part(tokenizer, conversations: Sequence, start: int, cutoff_len: int, train_on_prompt: bool,
                 truncation: Truncation | None) -> tuple[list[dict], Truncation | None]:
    """Conversations ``start``, ``start + 1``, ... encoded, and what their cut cost (``truncation``)."""
    encoded = [encode_conversation(tokenizer, messages, cutoff_len, train_on_prompt, index=start + offset,
                                   truncation=truncation) for offset, messages in enumerate(conversations)]
    return encoded, truncation


def _render(tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _prefix_end(text: str, prefix: str, after: int, where: str, n_messages: int) -> int:
    if not text.startswith(prefix) or len(prefix) < after:
        raise InputError(
            f"{where}the chat template renders the first {n_messages} messages as text that is "
            "not a prefix of the whole conversation's text (it rewrites earlier turns), so the "
            "response cannot be located; use template: chatml, llama3 or alpaca")
    return len(prefix)


# ------------------------------------------------------------------------------- batches


def pack(examples: Sequence[Mapping], max_len: int) -> list[dict]:
    """First-fit ``examples`` into rows of at most ``max_len`` tokens with per-example positions."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index, example in enumerate(examples):
        n = len(example["input_ids"])
        if not 0 < n <= max_len:
            raise InputError(f"example {index} has {n} tokens; packing needs 1 to max_len "
                             f"{max_len} (lower cutoff_len or raise max_len)")
        target = next((b for b, free in enumerate(room) if free >= n), None)
        if target is None:
            bins.append([])
            room.append(max_len)
            target = len(bins) - 1
        bins[target].append(index)
        room[target] -= n
    packed = []
    for members in bins:
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for index in members:
            example = examples[index]
            row["input_ids"] += list(example["input_ids"])
            row["labels"] += [IGNORE_INDEX] + list(example["labels"][1:])
            row["position_ids"] += list(range(len(example["input_ids"])))
        packed.append(row)
    return packed


def collate(batch: Sequence[Mapping], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; ``attention_mask`` for plain rows, ``position_ids`` for packed ones."""
    if not batch:
        raise InputError("cannot collate an empty batch")
    packed = ["position_ids" in example for example in batch]
    if any(packed) and not all(packed):
        raise InputError("a batch mixes packed rows (with position_ids) and plain rows")
    width = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    out = {"input_ids": input_ids, "labels": labels}
    if all(packed):
        out["position_ids"] = torch.arange(width).repeat(len(batch), 1)
    else:
        out["attention_mask"] = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example["input_ids"])
        if len(example["labels"]) != n:
            raise InputError(f"batch item {row}: {n} input_ids but {len(example['labels'])} labels")
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        if all(packed):
            out["position_ids"][row, :n] = torch.tensor(example["position_ids"], dtype=torch.long)
            out["position_ids"][row, n:] = torch.arange(width - n)
        else:
            out["attention_mask"][row, :n] = 1
    return out


def steps_per_epoch(n_examples: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches ``batches`` yields per epoch."""
    return n_examples // batch_size if drop_last else -(-n_examples // batch_size)


def batches(n_examples: int, batch_size: int, seed: int, epoch: int, start_step: int = 0,
            drop_last: bool = False) -> Iterator[list[int]]:
    """Index lists for one epoch, a pure function of ``(seed, epoch)``; resume with start_step."""
    if n_examples < 0 or batch_size < 1 or seed < 0 or epoch < 0 or start_step < 0:
        raise InputError(f"batches needs n_examples >= 0, batch_size >= 1 and seed, epoch, "
                         f"start_step >= 0; got {n_examples}, {batch_size}, {seed}, {epoch}, "
                         f"{start_step}")
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    for step in range(start_step, steps_per_epoch(n_examples, batch_size, drop_last)):
        yield order[step * batch_size: (step + 1) * batch_size].tolist()


def held_out_count(n_examples: int, val_size: float) -> int:
    """How many of ``n_examples`` ``val_size`` holds out: a fraction of them, rounded up (as
    datasets' train_test_split, which LLaMA-Factory calls), or a count. Refuses a split that
    leaves no example to train on (or, with val_size > 0, none to evaluate)."""
    if not val_size:
        return 0
    count = math.ceil(val_size * n_examples) if val_size < 1 else int(val_size)
    if not 0 < count < n_examples:
        raise InputError(f"config key 'val_size': {val_size:g} holds out {count} of the dataset's {n_examples} examples, "
                         f"leaving {n_examples - count} to train on; expected a fraction or a count that leaves at "
                         f"least one example on each side")
    return count


def split_held_out(n_examples: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) example indices, each in dataset order: the held-out ones are the
    first :func:`held_out_count` of a permutation drawn from ``seed`` alone (its own stream,
    independent of the epochs' orders), so every rank and every resumed run holds out the same."""
    count = held_out_count(n_examples, val_size)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))  # batches(): SeedSequence([seed, epoch])
    held = set(rng.permutation(n_examples)[:count].tolist())
    return [i for i in range(n_examples) if i not in held], sorted(held)
