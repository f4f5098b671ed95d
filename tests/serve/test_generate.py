"""Generation against independent references: transformers' own greedy generate, the uncached
recomputation, and each prompt run alone. Token ids are compared exactly: greedy decoding of a
float32 model; the references differ from the tested path only in the order of float32 sums,
far below the gaps between the top two logits on these prompts."""

import pytest
import torch

from fourbit.serve import Sampling, generate, stream
from fourbit.serve.generate import _filtered_probs, eos_token_ids

PROMPTS = [[1, 500, 17, 2300, 99], [7, 41], [1, 5, 9, 33, 200, 7, 64, 12]]


def greedy(n=10, **kw):
    return Sampling(max_new_tokens=n, **kw)


def test_greedy_matches_transformers_generate(chat_model):
    model, tokenizer, _ = chat_model
    ours = generate(model, tokenizer, [PROMPTS[0]], greedy(12), eos_ids=set())[0]
    with torch.no_grad():
        theirs = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0, min_new_tokens=12)
    assert ours.token_ids == theirs[0, len(PROMPTS[0]):].tolist()


def test_kv_cached_greedy_equals_uncached(chat_model):
    model, tokenizer, _ = chat_model
    cached = generate(model, tokenizer, PROMPTS, greedy(12), eos_ids=set())
    uncached = generate(model, tokenizer, PROMPTS, greedy(12), use_cache=False, eos_ids=set())
    assert [c.token_ids for c in cached] == [u.token_ids for u in uncached]


def test_a_left_padded_batch_equals_each_prompt_alone(chat_model):
    model, tokenizer, _ = chat_model
    batch = generate(model, tokenizer, PROMPTS, greedy(12), eos_ids=set())
    alone = [generate(model, tokenizer, [p], greedy(12), eos_ids=set())[0] for p in PROMPTS]
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]
    assert all(b.finish_reason == "length" and len(b.token_ids) == 12 for b in batch)
    assert [b.prompt_tokens for b in batch] == [len(p) for p in PROMPTS]


def test_eos_ends_a_row_without_emitting_it(chat_model):
    model, tokenizer, _ = chat_model
    free = generate(model, tokenizer, [PROMPTS[1]], greedy(8), eos_ids=set())[0].token_ids
    stopped = generate(model, tokenizer, [PROMPTS[1]], greedy(8), eos_ids={free[3]})[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free[: free.index(free[3])]


def test_eos_ids_include_the_chat_templates_end_of_turn(chat_model):
    model, tokenizer, _ = chat_model
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos_token_ids(model, tokenizer)


def test_stop_strings_cut_the_text_and_streaming_never_shows_them(chat_model):
    model, tokenizer, _ = chat_model
    full = generate(model, tokenizer, [PROMPTS[0]], greedy(16), eos_ids=set())[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3
    cut = generate(model, tokenizer, [PROMPTS[0]], greedy(16, stop=[stop]), eos_ids=set())[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]
    pieces = list(stream(model, tokenizer, [PROMPTS[0]], greedy(16, stop=[stop]), eos_ids=set()))
    assert "".join(p.text for p in pieces) == cut.text
    assert pieces[-1].finish_reason == "stop" and all(p.finish_reason is None for p in pieces[:-1])
    assert len(pieces) > 2  # text arrived in several pieces, not only at the end


def test_streaming_a_batch_reassembles_each_row(chat_model):
    model, tokenizer, _ = chat_model
    final = generate(model, tokenizer, PROMPTS, greedy(10), eos_ids=set())
    texts = ["", "", ""]
    for delta in stream(model, tokenizer, PROMPTS, greedy(10), eos_ids=set()):
        texts[delta.row] += delta.text
    assert texts == [c.text for c in final]


def test_sampling_is_reproducible_by_seed_and_per_row(chat_model):
    model, tokenizer, _ = chat_model
    hot = Sampling(max_new_tokens=10, temperature=1.5, seed=7)
    a = generate(model, tokenizer, [PROMPTS[0]], hot, eos_ids=set())[0].token_ids
    assert generate(model, tokenizer, [PROMPTS[0]], hot, eos_ids=set())[0].token_ids == a
    # the same request in a batch beside another draws the same tokens
    batched = generate(model, tokenizer, [PROMPTS[1], PROMPTS[0]], [greedy(10), hot], eos_ids=set())
    assert batched[1].token_ids == a
    other = generate(model, tokenizer, [PROMPTS[0]], Sampling(10, temperature=1.5, seed=8), eos_ids=set())[0]
    assert other.token_ids != a  # 10 draws from a near-flat 49152-way distribution


def test_top_k_1_and_a_tiny_top_p_are_greedy(chat_model):
    model, tokenizer, _ = chat_model
    want = generate(model, tokenizer, [PROMPTS[2]], greedy(8), eos_ids=set())[0].token_ids
    for s in (Sampling(8, temperature=2.0, top_k=1, seed=1), Sampling(8, temperature=2.0, top_p=1e-9, seed=1)):
        assert generate(model, tokenizer, [PROMPTS[2]], s, eos_ids=set())[0].token_ids == want


def test_filters_keep_what_top_k_and_top_p_say():
    logits = torch.log(torch.tensor([0.05, 0.4, 0.25, 0.3]))
    assert torch.allclose(_filtered_probs(logits, 1.0, 2, 1.0), torch.tensor([0, 0.4 / 0.7, 0, 0.3 / 0.7]))
    # top_p 0.6: 0.4 alone is short of 0.6, 0.4 + 0.3 reaches it: keep those two
    assert torch.allclose(_filtered_probs(logits, 1.0, 0, 0.6), torch.tensor([0, 0.4 / 0.7, 0, 0.3 / 0.7]))
    assert torch.allclose(_filtered_probs(logits, 1.0, 0, 1.0), torch.tensor([0.05, 0.4, 0.25, 0.3]))
    # temperature 2: p^(1/2), renormalized (float64 reference)
    tempered = torch.tensor([0.05, 0.4, 0.25, 0.3], dtype=torch.float64).sqrt()
    assert torch.allclose(_filtered_probs(logits, 2.0, 0, 1.0).double(), tempered / tempered.sum(), atol=1e-6)  # fp32


def test_a_vanishing_temperature_is_greedy_not_nan():
    # logits / 1e-30 overflow to inf, and softmax(inf - inf) is NaN: the maximum goes first.
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    for temperature in (1e-30, 1e-45):
        assert torch.equal(_filtered_probs(logits, temperature, 0, 1.0), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        _filtered_probs(torch.tensor([1.0, float("nan")]), 1.0, 0, 1.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"stop": [""]}, "stop strings"),
    # seeds torch.Generator.manual_seed refuses: caught here, not later inside a whole batch
    ({"seed": 1.5}, "seed"), ({"seed": 2**70}, "seed"), ({"seed": True}, "seed"),
])
def test_bad_sampling_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


def test_an_empty_prompt_is_refused(chat_model):
    model, tokenizer, _ = chat_model
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, tokenizer, [[]], greedy())
