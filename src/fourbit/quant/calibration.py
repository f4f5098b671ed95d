"""Calibration data for GPTQ and AWQ: token ids [sequences, length].

From a file: ``.txt`` is one text; ``.jsonl`` rows give their ``text`` field, or their
conversation (``messages``, sharegpt or alpaca fields, as training reads them) rendered with
the tokenizer's chat template. Without a file: the conversations of fourbit's built-in task
(train/default_task.py: generated, deterministic, no download), rendered the same way. The
texts are joined with the EOS token, tokenized, and cut into sequences of ``seq_len`` tokens, as
many as ``n_tokens`` allows; fewer than one full sequence of at least MIN_TOKENS is an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .layerwise import MIN_TOKENS


def calibration_tokens(tokenizer, path: str | os.PathLike | None = None, n_tokens: int = 16384,
                       seq_len: int = 512, method: str = "GPTQ") -> tuple[torch.Tensor, str]:
    """(ids [sequences, seq_len], a line saying where they came from and how many there are);
    ``method`` names who needs them in the error."""
    texts, origin = _texts(tokenizer, path)
    eos = tokenizer.eos_token or ""
    ids = tokenizer(eos.join(texts), add_special_tokens=False)["input_ids"]
    sequences = min(len(ids), n_tokens) // seq_len
    if sequences == 0 or sequences * seq_len < MIN_TOKENS:
        raise ValueError(f"calibration data from {origin} gives {len(ids)} tokens; {method} needs at least one sequence of "
                         f"seq_len={seq_len} and {MIN_TOKENS} tokens in all: add text or lower seq_len")
    tensor = torch.tensor(ids[: sequences * seq_len]).view(sequences, seq_len)
    return tensor, f"{sequences} sequences x {seq_len} tokens ({tensor.numel()} tokens) from {origin}"


def _texts(tokenizer, path) -> tuple[list[str], str]:
    if path is None:
        from ..train.default_task import make_default_dataset

        rows, _ = make_default_dataset()
        return _row_texts(tokenizer, rows), "fourbit's built-in task (generated)"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist")
    if path.suffix == ".txt":
        return [path.read_text()], str(path)
    if path.suffix != ".jsonl":
        raise ValueError(f"calibration file {path}: expected .txt or .jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return _row_texts(tokenizer, rows), str(path)


def _row_texts(tokenizer, rows: list[dict]) -> list[str]:
    """Each row's ``text``, or its conversation through the chat template."""
    from ..train.data import detect_format, to_messages

    if rows and all(isinstance(row.get("text"), str) for row in rows):
        return [row["text"] for row in rows]
    fmt = detect_format(rows, "calibration")
    return [tokenizer.apply_chat_template(to_messages(row, fmt, i), tokenize=False) for i, row in enumerate(rows)]
