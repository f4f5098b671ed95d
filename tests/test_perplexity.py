"""Sliding-window perplexity against a float64 computation written out here."""

import math

import pytest
import torch

from fourbit.perplexity import perplexity, read_text_tokens


def reference(model, ids, context, stride):
    """Token by token: each scored token's log-probability in float64, from its window."""
    nll, count, done = 0.0, 0, 1
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + context, len(ids))
        if end <= done:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids[begin:end]])).logits[0].double(), -1)
        for position in range(max(done, begin + 1), end):
            nll -= logp[position - begin - 1, ids[position]].item()
            count += 1
        done = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("context,stride", [(16, 8), (16, 16), (16, 5), (64, 32)])
def test_matches_the_token_by_token_computation(tiny_llama, context, stride):
    _, model = tiny_llama
    ids = torch.randint(0, 256, (101,), generator=torch.Generator().manual_seed(0)).tolist()
    got = perplexity(model, ids, context, stride)
    want, count = reference(model, ids, context, stride)
    assert got.tokens == count
    assert got.perplexity == pytest.approx(want, rel=1e-5)  # float32 logits vs float64 log-softmax


def test_every_token_after_the_first_counts_once_when_windows_overlap(tiny_llama):
    _, model = tiny_llama
    assert perplexity(model, list(range(100)), context=16, stride=8).tokens == 99
    assert perplexity(model, list(range(100)), context=16, stride=16).tokens == 100 - 7  # 7 window starts unscored


def test_bad_windows_and_files_are_named(tiny_llama, tmp_path, chat_tokenizer):
    _, model = tiny_llama
    with pytest.raises(ValueError, match="stride <= context"):
        perplexity(model, list(range(10)), context=4, stride=8)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [1], context=4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text_tokens(chat_tokenizer, tmp_path / "none.txt")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="expected .txt"):
        read_text_tokens(chat_tokenizer, tmp_path / "a.csv")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(ValueError, match="row 2 has no 'text' string"):
        read_text_tokens(chat_tokenizer, rows)
    rows.write_text('{"text": "one"}\n{"text": \n')
    with pytest.raises(ValueError, match="line 2: bad JSON"):
        read_text_tokens(chat_tokenizer, rows)
    rows.write_text('{"text": "one"}\n\n{"text": "two"}\n')  # blank lines skipped; rows joined by EOS
    assert read_text_tokens(chat_tokenizer, rows) == chat_tokenizer(
        "one" + chat_tokenizer.eos_token + "two", add_special_tokens=False)["input_ids"]
