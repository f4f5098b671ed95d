"""The continuous-batching engine: rows join and leave a running batch, each alone in effect.

The reference for every answer is serve/generate.py on the same model, one request alone and
greedy (the generation tests check that loop against transformers' own generate). The engine's
counters (steps, tokens decoded) measure what it spent, so the tests need no timing."""

import queue
import time

import pytest
import torch
from torch import nn

import fourbit
from fourbit.errors import InputError
from fourbit.nn.lora import lora_adapters
from fourbit.serve import Sampling, generate
from fourbit.serve.adapters import AdapterSet
from fourbit.serve.engine import Cancelled, Engine, on_own_thread, results
from fourbit.serve.generate import Completion


def greedy(n: int) -> Sampling:
    return Sampling(max_new_tokens=n)


@pytest.fixture(scope="module")
def poet(chat_model, tmp_path_factory):
    """A PEFT folder with a strong adapter (it changes greedy answers)."""
    _, _, folder = chat_model
    donor, _ = fourbit.load_model(folder, compute_dtype="float32", torch_dtype="float32")
    torch.manual_seed(1)
    fourbit.add_lora(donor, r=4, alpha=64, verbose=False)
    for adapter in lora_adapters(donor).values():
        nn.init.normal_(adapter.lora_B.weight, std=0.5)
    return fourbit.save_adapter(donor, tmp_path_factory.mktemp("adapters") / "poet")


@pytest.fixture(scope="module")
def engine(chat_model, poet):
    """An engine on the tiny model with the adapter, small prefill chunks (so prompts of a few
    dozen tokens are chunked), end of sequence off (every row decodes its max_new_tokens)."""
    _, tokenizer, folder = chat_model
    model, _ = fourbit.load_model(folder, compute_dtype="float32", torch_dtype="float32")
    engine = Engine(model, tokenizer, AdapterSet(model), max_batch=4, prefill_chunk=16)
    engine.eos = set()
    engine.load_adapter("poet", poet)
    yield engine
    engine.close(timeout=60)


def alone(engine, prompt, sampling, adapter=None) -> list[int]:
    with engine.paused(), engine.adapters.use(adapter):
        return generate(engine.model, engine.tokenizer, [prompt], sampling, eos_ids=set())[0].token_ids


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(5, 400, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def idle(engine):
    """Wait out what earlier tests left running (the engine is shared by the module)."""
    wait_for(lambda: engine.stats.running == 0 and engine.stats.waiting == 0)


def wait_for(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_rows_joining_and_leaving_get_what_they_would_alone(engine):
    idle(engine)
    # Prompts of 3 to 40 tokens (the long ones prefilled in chunks of 16), 2 to 12 new tokens,
    # with and without the adapter, arriving while others decode: more requests than rows, so
    # rows leave and others join at every stage.
    requests = [(prompt(i, [3, 40, 9, 23, 5, 17, 31, 4][i]), greedy([12, 3, 8, 2, 10, 6, 4, 9][i]),
                 "poet" if i % 3 == 0 else None) for i in range(8)]
    wants = [alone(engine, *r) for r in requests]
    before = engine.stats.batch_sizes.copy()
    out = queue.Queue()
    for i, (ids, sampling, adapter) in enumerate(requests):
        engine.submit(ids, sampling, adapter, out=out, tag=i)
        time.sleep(0.02 * (i % 3))  # some arrive together, some mid-decode
    got = {tag: item.token_ids for tag, item in results(out, len(requests)) if isinstance(item, Completion)}
    assert [got[i] for i in range(8)] == wants
    sizes = engine.stats.batch_sizes - before
    assert max(sizes) > 1 and max(sizes) <= 4  # shared steps, never more rows than max_batch


def test_a_short_request_finishes_in_its_own_time_next_to_long_ones(engine):
    idle(engine)
    long_ids = [engine.submit(prompt(20 + i, 30), greedy(60)) for i in range(2)]
    wait_for(lambda: engine.stats.running == 2)
    start = engine.stats.steps
    short = engine.submit(prompt(30, 6), greedy(4))
    answer = [item for _, item in results(short.out, 1) if isinstance(item, Completion)][0]
    # 4 tokens: the first from the prefill, then 3 decode steps; a step or two of slack for
    # the iteration the request arrived in. Static batching would have waited ~60 steps.
    assert engine.stats.steps - start <= 3 + 2
    assert answer.token_ids == alone(engine, prompt(30, 6), greedy(4))
    for ticket in long_ids:
        ticket.cancel()


def test_a_cancelled_row_stops_decoding_within_a_step_and_the_others_go_on(engine):
    idle(engine)
    keep = engine.submit(prompt(40, 8), greedy(40))
    gone = engine.submit(prompt(41, 8), greedy(1000), out=queue.Queue(), tag="gone")
    wait_for(lambda: engine.stats.running == 2)
    gone.cancel()
    with pytest.raises(Cancelled):  # the engine has dropped its row
        list(results(gone.out, 1))
    steps, decoded = engine.stats.steps, engine.stats.decoded_tokens
    wait_for(lambda: engine.stats.steps >= steps + 3 or engine.stats.running == 0)
    # after its cancellation was seen, at most one row decodes per step: the one kept
    assert engine.stats.decoded_tokens - decoded <= engine.stats.steps - steps
    answer = [item for _, item in results(keep.out, 1) if isinstance(item, Completion)][0]
    assert answer.token_ids == alone(engine, prompt(40, 8), greedy(40))


def test_one_rows_failure_or_unloaded_adapter_ends_that_row_alone(engine, poet):
    idle(engine)
    base_ids, poet_ids, bad_ids = prompt(50, 7), prompt(51, 7), prompt(52, 7)
    bad = Sampling(max_new_tokens=30, temperature=1.0, seed=0)
    bad.top_k = "many"  # a value that fails when the row samples (validation is the server's job)
    out = queue.Queue()
    engine.submit(base_ids, greedy(30), out=out, tag="base")
    engine.submit(bad_ids, bad, out=out, tag="bad")
    engine.submit(poet_ids, greedy(200), "poet", out=out, tag="poet")
    answers, errors, poet_decoding = {}, {}, False
    while len(answers) + len(errors) < 3:
        tag, item = out.get(timeout=120)
        if isinstance(item, Completion):
            answers[tag] = item
        elif isinstance(item, BaseException):
            errors[tag] = item
        elif tag == "poet" and not poet_decoding:  # its first piece of text: it is decoding now
            poet_decoding = True
            engine.unload_adapter("poet")
    finished = {tag: (c.finish_reason, len(c.token_ids)) for tag, c in answers.items()}
    assert set(errors) == {"bad", "poet"} and "unloaded" in str(errors["poet"]), (errors, finished)
    assert answers["base"].token_ids == alone(engine, base_ids, greedy(30))
    engine.load_adapter("poet", poet)


def test_a_request_past_its_time_ends_as_length_and_an_unknown_adapter_fails_alone(engine):
    idle(engine)
    ticket = engine.submit(prompt(60, 5), greedy(10_000), seconds=0.05)
    done = [item for _, item in results(ticket.out, 1) if isinstance(item, Completion)][0]
    assert done.finish_reason == "length" and len(done.token_ids) < 10_000
    with pytest.raises(InputError, match="no adapter named 'nobody'"):
        list(results(engine.submit(prompt(61, 5), greedy(3), "nobody").out, 1))


def completion(ticket) -> Completion:
    return [item for _, item in results(ticket.out, 1) if isinstance(item, Completion)][0]


def answer(ticket) -> list[int]:
    return completion(ticket).token_ids


def test_a_prompt_reuses_the_prefix_another_computed_and_gets_what_it_would_alone(engine, poet):
    idle(engine)
    shared = prompt(90, 16)  # two blocks of the prefix cache (8 tokens each)
    first, second, fresh = shared + prompt(91, 5), shared + prompt(92, 4), prompt(93, 6)
    assert answer(engine.submit(first, greedy(5))) == alone(engine, first, greedy(5))
    reused = engine.stats.reused_tokens
    with engine.paused():  # both are admitted in one iteration: one prefill, one row with a prefix, one without
        tickets = [engine.submit(second, greedy(6)), engine.submit(fresh, greedy(6))]
    assert [answer(t) for t in tickets] == [alone(engine, second, greedy(6)), alone(engine, fresh, greedy(6))]
    assert engine.stats.reused_tokens - reused == 16

    # computed with the adapter, a prefix serves the adapter's requests alone; reloading the
    # adapter (other weights may come under the same name) forgets them
    reused = engine.stats.reused_tokens
    assert answer(engine.submit(second, greedy(6), "poet")) == alone(engine, second, greedy(6), "poet")
    assert engine.stats.reused_tokens == reused
    assert answer(engine.submit(first, greedy(5), "poet")) == alone(engine, first, greedy(5), "poet")
    assert engine.stats.reused_tokens - reused == 16
    engine.unload_adapter("poet")
    engine.load_adapter("poet", poet)
    assert answer(engine.submit(first, greedy(5), "poet")) == alone(engine, first, greedy(5), "poet")
    assert engine.stats.reused_tokens - reused == 16

    # a request for the prompt's logprobs computes all of it (the logits are the answer)
    reused = engine.stats.reused_tokens
    echo = Sampling(max_new_tokens=2, prompt_logprobs=True)
    assert len(completion(engine.submit(first, echo)).prompt_logprobs) == len(first)
    assert engine.stats.reused_tokens == reused


def test_close_drains_what_was_taken_and_refuses_the_rest(chat_model):
    model, tokenizer, _ = chat_model
    engine = Engine(model, tokenizer, max_batch=2, dense_cache=False)
    engine.eos = set()
    tickets = [engine.submit(prompt(70 + i, 5), greedy(5)) for i in range(3)]
    engine.close(timeout=120)
    assert not engine._worker.is_alive()
    for ticket in tickets:
        assert [item for _, item in results(ticket.out, 1) if isinstance(item, Completion)][0].token_ids
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit(prompt(80, 5), greedy(5))


def test_on_own_thread_returns_what_the_work_returns_on_another_thread_and_raises_what_it_raises():
    import threading

    assert on_own_thread(lambda a, b: (a + b, threading.current_thread().name), 2, 3) == (5, "fourbit-load")
    with pytest.raises(InputError, match="bad"):
        on_own_thread(lambda: (_ for _ in ()).throw(InputError("bad")))
