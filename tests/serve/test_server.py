"""The OpenAI-compatible server over real HTTP, driven by the official ``openai`` client.

Expected answers come from serve/generate.py called directly on the same model (greedy, so
exact), which the generation tests check against transformers' own generate."""

import http.client
import json
import threading

import pytest
import torch
from torch import nn

import fourbit
from fourbit.nn.lora import lora_adapters
from fourbit.serve import Sampling, generate
from fourbit.serve.adapters import AdapterSet
from fourbit.serve.engine import Engine
from fourbit.serve.server import Limits, OpenAIServer, make_http_server

openai = pytest.importorskip("openai")
KEY = "sk-test-0123456789"


def adapter(folder, out, seed):
    donor, _ = fourbit.load_model(folder, compute_dtype="float32", torch_dtype="float32")
    torch.manual_seed(seed)
    fourbit.add_lora(donor, r=4, alpha=64, target="all-linear", verbose=False)
    for adapter in lora_adapters(donor).values():
        nn.init.normal_(adapter.lora_B.weight, std=0.5)  # strong enough to change greedy answers
    fourbit.save_adapter(donor, out)
    return out


@pytest.fixture(scope="module")
def served(chat_model, tmp_path_factory):
    """A running server (key required, runtime adapters allowed under a root) and its parts."""
    _, tokenizer, folder = chat_model
    root = tmp_path_factory.mktemp("adapter-root")
    model, _ = fourbit.load_model(folder, compute_dtype="float32", torch_dtype="float32")
    adapters = AdapterSet(model)
    adapters.add("poet", adapter(folder, root / "poet", seed=1))
    adapter(folder, root / "spare", seed=2)
    engine = Engine(model, tokenizer, adapters, max_batch=16)
    api = OpenAIServer(engine, "tiny", api_key=KEY, adapter_root=root,
                       limits=Limits(max_body_bytes=4096, max_concurrent=24, max_n=3, max_stop=2))
    server = make_http_server(api, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key=KEY, max_retries=0)
    yield {"client": client, "api": api, "server": server, "model": model, "tokenizer": tokenizer,
           "adapters": adapters, "root": root, "engine": engine}
    server.shutdown()
    server.server_close()
    # its worker thread ends, and with it that thread's OpenMP pool: left alive, two pools on 2 CPUs
    # stop libgomp spinning and every later test's torch ops run ~1.5x slower (serve/engine.py on_own_thread)
    engine.close(timeout=30)


def expected_chat(s, messages, max_tokens, adapter=None):
    tokenizer = s["tokenizer"]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with s["engine"].paused(), s["adapters"].use(adapter):
        return generate(s["model"], tokenizer, [ids], Sampling(max_new_tokens=max_tokens))[0]


def raw(s, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection(*s["server"].server_address[:2], timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.read()


MESSAGES = [{"role": "user", "content": "Name a colour."}]


def test_models_lists_the_base_and_adapters(served):
    ids = [m.id for m in served["client"].models.list().data]
    assert ids[0] == "tiny" and "poet" in ids


def test_chat_completion_and_usage(served):
    answer = served["client"].chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8)
    want = expected_chat(served, MESSAGES, 8)
    assert answer.choices[0].message.content == want.text
    assert answer.choices[0].finish_reason == want.finish_reason
    assert answer.usage.prompt_tokens == want.prompt_tokens
    assert answer.usage.completion_tokens == len(want.token_ids)
    assert answer.usage.total_tokens == want.prompt_tokens + len(want.token_ids)


def test_the_model_field_selects_an_adapter(served):
    poet = served["client"].chat.completions.create(model="poet", messages=MESSAGES, max_tokens=8)
    assert poet.choices[0].message.content == expected_chat(served, MESSAGES, 8, "poet").text
    assert poet.choices[0].message.content != expected_chat(served, MESSAGES, 8).text
    with pytest.raises(openai.NotFoundError):
        served["client"].chat.completions.create(model="nobody", messages=MESSAGES, max_tokens=4)


def test_streaming_chat_reassembles_the_answer(served):
    chunks = list(served["client"].chat.completions.create(
        model="poet", messages=MESSAGES, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want = expected_chat(served, MESSAGES, 10, "poet")
    assert text == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_completions_plain_and_streaming(served):
    tokenizer = served["tokenizer"]
    want = generate(served["model"], tokenizer, [tokenizer("Once upon a time")["input_ids"]], Sampling(max_new_tokens=7))[0]
    plain = served["client"].completions.create(model="tiny", prompt="Once upon a time", max_tokens=7)
    assert plain.choices[0].text == want.text and plain.usage.completion_tokens == len(want.token_ids)
    streamed = served["client"].completions.create(model="tiny", prompt="Once upon a time", max_tokens=7, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want.text


def test_n_choices_with_a_seed_differ_and_repeat(served):
    ask = dict(model="tiny", messages=MESSAGES, max_tokens=6, n=3, temperature=1.5, seed=11)
    first = served["client"].chat.completions.create(**ask)
    again = served["client"].chat.completions.create(**ask)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1 and [c.index for c in first.choices] == [0, 1, 2]


def test_auth_no_key_wrong_key_right_key(served):
    assert raw(served, "GET", "/v1/models")[0] == 401
    assert raw(served, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert raw(served, "GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    status, body = raw(served, "GET", "/health")  # no key needed
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    base = str(served["client"].base_url)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()


def test_limits_413_400_and_caps(served):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = json.dumps({"model": "tiny", "prompt": "x" * 5000}).encode()
    assert raw(served, "POST", "/v1/completions", big, auth)[0] == 413
    client = served["client"]
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="hello", max_tokens=10_000)  # context is 128
    with pytest.raises(openai.BadRequestError, match="'n'"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=4)
    with pytest.raises(openai.BadRequestError, match="'stop'"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, stop=["a", "b", "c"])
    with pytest.raises(openai.BadRequestError, match="max_tokens: Input should be greater than or equal to 1"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=0)  # not the default
    with pytest.raises(openai.BadRequestError, match="seed: Input should be less than"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, seed=2**70)  # refused alone, not per batch
    assert raw(served, "POST", "/v1/chat/completions", b"{not json", auth)[0] == 400


def test_beyond_max_concurrent_answers_429_at_once(served):
    api = served["api"]
    hold = api.reserve(api.limits.max_concurrent, None)  # every row taken
    try:
        with pytest.raises(openai.RateLimitError):
            served["client"].chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    finally:
        hold.release()
    assert served["client"].chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices


def test_a_burst_of_concurrent_requests_is_batched_and_correct(served):
    questions = [[{"role": "user", "content": f"Count to {i}."}] for i in range(16)]
    choices = [None if i % 2 else "poet" for i in range(16)]
    wants = [expected_chat(served, q, 6, c) for q, c in zip(questions, choices)]
    answers = [None] * 16
    before = served["engine"].stats.batch_sizes.copy()

    def ask(i):
        answers[i] = served["client"].chat.completions.create(
            model=choices[i] or "tiny", messages=questions[i], max_tokens=6).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [w.text for w in wants]
    assert max(served["engine"].stats.batch_sizes - before) > 1  # shared forward passes, not one by one


def test_runtime_adapters_only_from_under_the_root(served, tmp_path):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def post(path, body):
        return raw(served, "POST", path, json.dumps(body).encode(), auth)

    assert post("/v1/load_lora_adapter", {"lora_name": "spare", "lora_path": "spare"})[0] == 200
    assert "spare" in [m.id for m in served["client"].models.list().data]
    assert post("/v1/unload_lora_adapter", {"lora_name": "spare"})[0] == 200
    assert post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "../outside"})[0] == 403
    assert post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)})[0] == 403
    (served["root"] / "pickled").mkdir()
    (served["root"] / "pickled" / "adapter_config.json").write_text(
        (served["root"] / "spare" / "adapter_config.json").read_text())
    (served["root"] / "pickled" / "adapter_model.bin").write_bytes(b"not loaded")
    status, body = post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "pickled"})
    assert status == 400 and b"safetensors" in body


def test_cli_serve_binds_locally_and_takes_the_key_from_the_environment(chat_model, tmp_path):
    import os
    import re
    import subprocess
    import sys

    _, _, folder = chat_model
    env = {**os.environ, "FOURBIT_API_KEY": "sk-env", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", "import sys; from fourbit.cli import main; sys.exit(main())",
                                "serve", str(folder), "--port", "0", "--max-tokens", "3"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = ""
        while "serving" not in line:
            line = process.stdout.readline()
            assert line or process.poll() is None, "the server exited before serving"
        host, port = re.search(r"http://([\d.]+):(\d+)/v1", line).groups()
        assert host == "127.0.0.1"
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="sk-env", max_retries=0)
        assert [m.id for m in client.models.list().data] == [folder.name]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="nope", max_retries=0).models.list()
        # --max-tokens is the default for a request without max_tokens (greedy: the same tokens each run)
        answer = client.completions.create(model=folder.name, prompt="Count:")
        assert answer.usage.completion_tokens == 3 and answer.choices[0].finish_reason == "length"
    finally:
        process.terminate()
        process.wait(timeout=30)


def reference_logprobs(s, ids):
    """log-softmax of the served model's own logits on ``ids`` (transformers' forward, one row,
    no adapter): position i gives token i + 1's log-probability. The server batches and pads, so
    its float32 sums run in another order: 1e-5 absolute on log-probabilities of magnitude ~10."""
    with s["engine"].paused(), s["adapters"].use(None), torch.no_grad():
        return torch.log_softmax(s["model"](input_ids=torch.tensor([ids])).logits[0].float(), -1)


def test_completions_echo_the_prompt_with_the_models_log_probabilities(served):
    tokenizer = served["tokenizer"]
    ids = tokenizer("The colour of the sky is")["input_ids"]
    out = served["client"].completions.create(model="tiny", prompt=ids, max_tokens=2, logprobs=3, echo=True,
                                              temperature=0)
    choice = out.choices[0]
    generated = tokenizer(choice.text[len(tokenizer.decode(ids)):], add_special_tokens=False)["input_ids"]
    lp = reference_logprobs(served, ids + generated)
    got = choice.logprobs
    assert choice.text.startswith(tokenizer.decode(ids)) and len(got.tokens) == len(ids) + 2
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None  # nothing predicts the first token
    for i, token in enumerate((ids + generated)[1:], start=1):
        assert got.token_logprobs[i] == pytest.approx(lp[i - 1, token].item(), abs=1e-5)
        assert len(got.top_logprobs[i]) == 3
        assert max(got.top_logprobs[i].values()) == pytest.approx(lp[i - 1].max().item(), abs=1e-5)
    assert got.tokens == [tokenizer.decode([t]) for t in ids + generated]
    assert got.text_offset == [sum(len(t) for t in got.tokens[:i]) for i in range(len(got.tokens))]
    # greedy: each generated token is its position's most likely one
    assert [lp[len(ids) - 1 + k].argmax().item() for k in range(2)] == generated


def test_prompts_as_strings_or_token_ids_in_lists(served):
    tokenizer = served["tokenizer"]
    texts = ["Once upon a time", "The end"]
    by_text = served["client"].completions.create(model="tiny", prompt=texts, max_tokens=3)
    by_ids = served["client"].completions.create(model="tiny", prompt=[tokenizer(t)["input_ids"] for t in texts],
                                                 max_tokens=3)
    assert [c.text for c in by_text.choices] == [c.text for c in by_ids.choices] and len(by_ids.choices) == 2
    with pytest.raises(openai.BadRequestError, match="vocabulary size"):
        served["client"].completions.create(model="tiny", prompt=[[1, len(tokenizer) + 5]], max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="logprobs: Input should be less than or equal to 20"):
        served["client"].completions.create(model="tiny", prompt="x", max_tokens=1, logprobs=21)


def test_chat_log_probabilities_in_openais_shape(served):
    tokenizer = served["tokenizer"]
    out = served["client"].chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, logprobs=True,
                                                   top_logprobs=2)
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    content = out.choices[0].logprobs.content
    generated = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(c.token)) for c in content]
    lp = reference_logprobs(served, prompt + [t[0] for t in generated])
    for k, entry in enumerate(content):
        assert entry.logprob == pytest.approx(lp[len(prompt) - 1 + k].max().item(), abs=1e-5)  # greedy
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode() == entry.token
    with pytest.raises(openai.BadRequestError, match="'top_logprobs' needs 'logprobs': true"):
        served["client"].chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1, top_logprobs=2)


def test_tokenize_and_detokenize_in_vllms_shape(served):
    tokenizer = served["tokenizer"]
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, body = raw(served, "POST", "/tokenize", json.dumps({"prompt": "Hello there"}).encode(), auth)
    answer = json.loads(body)
    assert status == 200 and answer["tokens"] == tokenizer("Hello there")["input_ids"]
    assert answer["count"] == len(answer["tokens"])
    status, body = raw(served, "POST", "/detokenize", json.dumps({"tokens": answer["tokens"]}).encode(), auth)
    assert status == 200 and json.loads(body) == {"prompt": tokenizer.decode(answer["tokens"])}
    status, body = raw(served, "POST", "/tokenize", json.dumps({"messages": MESSAGES}).encode(), auth)
    chat_text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert json.loads(body)["tokens"] == tokenizer(chat_text, add_special_tokens=False)["input_ids"]
    assert raw(served, "POST", "/detokenize", json.dumps({"tokens": [-1]}).encode(), auth)[0] == 400
    status, body = raw(served, "GET", "/tokenizer_info", None, auth)
    info = json.loads(body)
    assert status == 200 and info["eos_token"] == tokenizer.eos_token == "<|im_end|>"
    assert info["chat_template"] == tokenizer.chat_template and info["model_max_length"] == served["api"].context
