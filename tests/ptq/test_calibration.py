"""Calibration data: the default is general prose that compare's default text does not contain."""

import json

import pytest
import torch

from fourbit.compare import default_text_ids
from fourbit.ptq.calibration import calibration_tokens


def test_default_is_python_documentation_disjoint_from_compares_text(chat_tokenizer):
    from pydoc_data.topics import topics

    ids, origin = calibration_tokens(chat_tokenizer, None, n_tokens=2048, seq_len=256)
    assert ids.shape == (8, 256) and ids.dtype == torch.long
    assert "documentation topics (pydoc_data, last keys first)" in origin and "(2048 tokens)" in origin
    last_topic = topics[sorted(topics)[-1]]
    assert chat_tokenizer.decode(ids[0, :30]) in last_topic  # read from the last key backwards
    # compare scores the first 8192 tokens from the other end: the topics each side reads do not meet
    scored, _ = default_text_ids(chat_tokenizer)
    ordered = [topics[k] for k in sorted(topics)]
    forward = topics_covering(len(chat_tokenizer.decode(scored)), ordered)
    backward = topics_covering(len(chat_tokenizer.decode(ids.flatten())), ordered[::-1])
    assert forward + backward <= len(ordered), (forward, backward, len(ordered))


def topics_covering(chars: int, texts: list[str]) -> int:
    """How many of ``texts``, joined in order by two characters, a prefix of ``chars`` reaches into."""
    total = 0
    for count, text in enumerate(texts, 1):
        total += len(text) + 2
        if total >= chars:
            return count
    return len(texts)


def test_jsonl_text_rows_and_bad_files(chat_tokenizer, tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"row {i} " + "words and more words " * 20}) for i in range(20)))
    ids, origin = calibration_tokens(chat_tokenizer, path, n_tokens=512, seq_len=128)
    assert ids.shape == (4, 128) and str(path) in origin
    csv = tmp_path / "x.csv"
    csv.write_text("a,b")
    with pytest.raises(ValueError, match=r"expected \.txt or \.jsonl"):
        calibration_tokens(chat_tokenizer, csv)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        calibration_tokens(chat_tokenizer, tmp_path / "missing.txt")
