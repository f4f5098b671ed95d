"""serve/cache_keyword.py: the KV cache passed and taken back under the name the installed
transformers uses (``cache`` from 5.24, ``past_key_values`` before), so that generating raises
none of its deprecation warnings."""

import logging
import queue
import warnings

import torch

from fourbit.serve import Sampling, generate
from fourbit.serve.cache_keyword import cache_keyword, returned_cache
from fourbit.serve.engine import Engine, results
from fourbit.serve.generate import Completion


def test_the_name_is_the_one_the_forward_takes():
    class Renamed(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None):
            return None

    class Before(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return None

    assert cache_keyword(Renamed()) == "cache"
    assert cache_keyword(Before()) == "past_key_values"


def test_generating_raises_no_deprecation_of_the_caches_name(chat_model, caplog):
    model, tokenizer, _ = chat_model
    prompts = [tokenizer("Hello there")["input_ids"], tokenizer("Hi")["input_ids"]]
    sampling = Sampling(max_new_tokens=4)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        for decode_step in (True, False):  # the step of fourbit's own, and the model's forward every token
            generate(model, tokenizer, prompts, sampling, eos_ids=set(), decode_step=decode_step)
        engine = Engine(model, tokenizer, max_batch=2)  # its prefills, and its batched steps
        try:
            out = queue.Queue()
            for tag, ids in enumerate(prompts):
                engine.submit(ids, sampling, out=out, tag=tag)
            assert sum(isinstance(item, Completion) for _, item in results(out, len(prompts))) == len(prompts)
        finally:
            engine.close(timeout=60)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [text for text in said if "past_key_values" in text], said


def test_the_returned_cache_is_the_forwards(chat_model):
    model, tokenizer, _ = chat_model
    ids = torch.tensor([tokenizer("Hello there")["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = returned_cache(out)
    assert cache is not None and cache.get_seq_length() == ids.shape[1]
