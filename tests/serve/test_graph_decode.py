"""GraphDecoder against serve.generate's greedy loop (the reference: dynamic cache, no compile).

Same model, same prompt, float32 on the CPU: the static cache and the compiled step change
only where the products run, so the argmax tokens must be identical (a near-tie could flip
them; on this seeded model the margins are far above float32 rounding, and a flip would fail
loudly rather than pass wrongly).
"""

import pytest

from fourbit.serve.generate import Sampling, generate
from fourbit.serve.graph_decode import GraphDecoder

PROMPT = [1, 17, 300, 42, 9, 4000, 77]


def reference(model, tokenizer, n, eos=()):
    return generate(model, tokenizer, [PROMPT], Sampling(max_new_tokens=n), eos_ids=set(eos))[0].token_ids


def test_eager_static_cache_matches_generate(chat_model):
    model, tokenizer, _ = chat_model
    decoder = GraphDecoder(model, max_length=64, compile=False, check_every=4)
    expected = reference(model, tokenizer, 20)
    assert decoder.generate(PROMPT, 20) == expected
    assert decoder.generate(PROMPT, 20) == expected  # the cache is reset between sequences


def test_compiled_step_matches_generate(chat_model):
    model, tokenizer, _ = chat_model
    decoder = GraphDecoder(model, max_length=48, compile=True, check_every=5)
    assert decoder.generate(PROMPT, 12) == reference(model, tokenizer, 12)


def test_stops_before_the_first_end_of_sequence_id(chat_model):
    model, tokenizer, _ = chat_model
    free = reference(model, tokenizer, 20)
    eos = free[6]
    cut = free[:free.index(eos)]
    decoder = GraphDecoder(model, max_length=64, compile=False, check_every=4)
    assert decoder.generate(PROMPT, 20, eos_ids={eos}) == cut == reference(model, tokenizer, 20, eos={eos})


def test_bad_lengths_are_refused(chat_model):
    model, _, _ = chat_model
    decoder = GraphDecoder(model, max_length=16, compile=False)
    with pytest.raises(ValueError,
                       match=r"prompt \(7 tokens\) \+ max_new_tokens \(10\) exceeds this decoder's max_length \(16\)"):
        decoder.generate(PROMPT, 10)
    with pytest.raises(ValueError, match="at least one token"):
        decoder.generate([], 3)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        GraphDecoder(model, max_length=1)
