"""Calibration data for GPTQ and AWQ: token ids [sequences, length].

From a file: ``.txt`` is one text; ``.jsonl`` rows give their ``text`` field, or their
conversation (``messages``, sharegpt or alpaca fields, as training reads them) rendered with
the tokenizer's chat template. Without a file: general English prose, Python's documentation
topics read from the last key backwards (reference_text.py; ``fourbit compare`` scores the other
end). Not fourbit's built-in task: its conversations repeat one template, and GPTQ calibrated on
them did worse than round-to-nearest on any other text (bench/RESULTS.md). The
texts are joined with the EOS token, tokenized, and cut into sequences of ``seq_len`` tokens, as
many as ``n_tokens`` allows; fewer than one full sequence of at least MIN_TOKENS is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InputError
from ..io.datasets import load_rows
from ..reference_text import describe, documentation_topics
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
        raise InputError(f"calibration data from {origin} gives {len(ids)} tokens; {method} needs at least one sequence of "
                         f"seq_len={seq_len} and {MIN_TOKENS} tokens in all: add text or lower seq_len")
    tensor = torch.tensor(ids[: sequences * seq_len]).view(sequences, seq_len)
    return tensor, f"{sequences} sequences x {seq_len} tokens ({tensor.numel()} tokens) from {origin}"


def _texts(tokenizer, path) -> tuple[list[str], str]:
    if path is None:
        return documentation_topics(reverse=True), describe("last keys first")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist")
    if path.suffix == ".txt":
        return [path.read_text()], str(path)
    if path.suffix != ".jsonl":
        raise InputError(f"calibration file {path}: expected .txt or .jsonl")
    return _row_texts(tokenizer, load_rows(path)), str(path)


def _row_texts(tokenizer, rows: list[dict]) -> list[str]:
    """Each row's ``text``, or its conversation through the chat template."""
    from ..io.datasets import detect_format, to_messages

    if rows and all(isinstance(row.get("text"), str) for row in rows):
        return [row["text"] for row in rows]
    fmt = detect_format(rows, "calibration")
    return [tokenizer.apply_chat_template(to_messages(row, fmt, i), tokenize=False) for i, row in enumerate(rows)]
