"""The server against hostile or careless clients, over real sockets: one request never fails
another, work is bounded, and bad input gets a 4xx in OpenAI's error shape.

Each test is a class of fault a probe of the earlier server found (http.server, static
batches): there a bad value in one request failed its whole batch, unloading an adapter failed
every queued request, a prompt list bypassed the in-flight cap, a gone client's stream decoded
to the end, and malformed requests answered 500. Expected answers come from serve/generate.py
on the same model, alone and greedy."""

import http.client
import json
import os
import socket
import threading
import time

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
MESSAGES = [{"role": "user", "content": "Name a colour."}]


def make_adapter(folder, out, seed):
    donor, _ = fourbit.load_model(folder, compute_dtype="float32", torch_dtype="float32")
    torch.manual_seed(seed)
    fourbit.add_lora(donor, r=4, alpha=64, verbose=False)
    for adapter in lora_adapters(donor).values():
        nn.init.normal_(adapter.lora_B.weight, std=0.5)
    return fourbit.save_adapter(donor, out)


@pytest.fixture(scope="module")
def served(chat_model, tmp_path_factory):
    _, tokenizer, folder = chat_model
    root = tmp_path_factory.mktemp("root")
    for i, name in enumerate(("poet", "spare", "third")):
        make_adapter(folder, root / name, seed=i + 1)
    model, _ = fourbit.load_model(folder, compute_dtype="float32", torch_dtype="float32")
    engine = Engine(model, tokenizer, AdapterSet(model), max_batch=8)
    limits = Limits(max_body_bytes=4096, max_concurrent=12, max_n=3, keep_alive_seconds=1, max_adapters=2)
    api = OpenAIServer(engine, "tiny", adapter_root=root, limits=limits)
    server = make_http_server(api, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    yield {"client": client, "api": api, "engine": engine, "port": port, "root": root, "folder": folder,
           "model": model, "tokenizer": tokenizer}
    server.shutdown(timeout=30)
    server.server_close()
    engine.close(timeout=30)


def expected(s, max_tokens, adapter=None, messages=MESSAGES):
    tokenizer = s["tokenizer"]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with s["engine"].paused(), s["engine"].adapters.use(adapter):
        return generate(s["model"], tokenizer, [ids], Sampling(max_new_tokens=max_tokens))[0].text


def send(s, data: bytes, read: bool = True, timeout: float = 30) -> bytes:
    """Raw bytes to the server; its whole answer (until it closes, or one response is complete)."""
    with socket.create_connection(("127.0.0.1", s["port"]), timeout=timeout) as sock:
        sock.sendall(data)
        if not read:
            return b""
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return answer
            if not chunk:
                return answer
            answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
            if length and len(body) >= length[0]:
                return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def post(s, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", s["port"], timeout=60)
    connection.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, json.loads(data) if data else {}


def test_a_pathological_value_in_one_request_never_fails_its_neighbours(served):
    client, answers = served["client"], {}

    def ask(name, **extra):
        try:
            answers[name] = client.chat.completions.create(model=extra.pop("model", "tiny"), messages=MESSAGES,
                                                           max_tokens=6, **extra).choices[0].message.content
        except openai.APIError as e:
            answers[name] = e

    asks = [("tiny-temperature", {"temperature": 1e-30}), ("base", {}), ("poet", {"model": "poet"}),
            ("huge-top-k", {"extra_body": {"top_k": 10**9}, "temperature": 1.0, "seed": 3})]
    threads = [threading.Thread(target=ask, args=(name,), kwargs=extra) for name, extra in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers["base"] == expected(served, 6)
    assert answers["poet"] == expected(served, 6, "poet")
    assert answers["tiny-temperature"] == expected(served, 6)  # so small a temperature is greedy
    assert isinstance(answers["huge-top-k"], str)


def test_unloading_an_adapter_fails_its_own_requests_only(served):
    client, api = served["client"], served["api"]
    results = {}

    def ask(name, model, tokens):
        try:
            results[name] = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=tokens,
                                                           temperature=0).choices[0].message.content
        except openai.APIError as e:
            results[name] = e

    threads = [threading.Thread(target=ask, args=(f"spare{i}", "spare", 60)) for i in range(3)]
    threads += [threading.Thread(target=ask, args=("base", "tiny", 20)),
                threading.Thread(target=ask, args=("poet", "poet", 20))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while "spare" not in served["engine"].adapters.names or served["engine"].stats.running < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    status, _ = post(served, "/v1/unload_lora_adapter", json.dumps({"lora_name": "spare"}).encode())
    for t in threads:
        t.join()
    assert status == 200
    assert results["base"] == expected(served, 20) and results["poet"] == expected(served, 20, "poet")
    # each finished before the unload, or failed with a 4xx naming the adapter: unloaded while it
    # ran, or (a thread that reached the server only after the unload) not loaded at all
    for i in range(3):
        answer = results[f"spare{i}"]
        assert isinstance(answer, str) or (isinstance(answer, openai.BadRequestError) and (
            "adapter 'spare' was unloaded while the request ran" in str(answer)
            or "no adapter named 'spare' is loaded" in str(answer))), answer
    api.reserve(api.limits.max_concurrent, None).release()  # a 429 here: rows were not given back


def test_every_prompt_of_a_list_and_every_choice_counts_against_the_cap(served):
    client = served["client"]  # max_concurrent 12
    with pytest.raises(openai.RateLimitError, match="needs 13 rows"):
        client.completions.create(model="tiny", prompt=["a b"] * 13, max_tokens=2)
    with pytest.raises(openai.RateLimitError, match="needs 15 rows"):
        client.completions.create(model="tiny", prompt=["a b"] * 5, max_tokens=2, n=3)
    assert len(client.completions.create(model="tiny", prompt=["a b"] * 4, max_tokens=2, n=3).choices) == 12


def test_a_stream_whose_client_left_stops_decoding(served):
    engine = served["engine"]
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 90, "stream": True}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    cancelled = engine.stats.cancelled
    with socket.create_connection(("127.0.0.1", served["port"]), timeout=60) as sock:
        sock.sendall(request)
        seen = b""
        while b"data:" not in seen:  # it is streaming
            seen += sock.recv(65536)
        assert seen.startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 30
    while engine.stats.cancelled == cancelled:
        assert time.monotonic() < deadline, "the row was never cancelled"
        time.sleep(0.01)
    decoded = engine.stats.decoded_tokens
    time.sleep(0.5)
    assert engine.stats.decoded_tokens == decoded and engine.stats.running == 0


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET /v1/mod\x00els HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/mod%00els HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_malformed_framing_gets_a_4xx_at_once(served, request_bytes):
    assert 400 <= status_of(send(served, request_bytes, timeout=10)) < 500


@pytest.mark.parametrize("body,field", [
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "UTF-8"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    (json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": True}).encode(), "max_tokens"),
    (json.dumps({"model": "tiny", "messages": MESSAGES, "seed": 2**64 - 1, "n": 2}).encode(), "2**64"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}).encode(), "text only"),
])
def test_bad_values_get_a_400_in_openais_error_shape(served, body, field):
    status, answer = post(served, "/v1/chat/completions", body)
    assert status == 400 and field in answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"


def test_a_chunked_body_is_read(served):
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 3}).encode()
    half = len(body) // 2
    chunked = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:half], body[half:])) + b"0\r\n\r\n"
    answer = send(served, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked)
    assert status_of(answer) == 200
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["choices"][0]["message"]["content"] == expected(served, 3)


def test_adapter_folders_that_are_broken_or_lead_outside_the_root_are_refused(served, tmp_path):
    root = served["root"]
    for name, config in (("no-r", {"peft_type": "LORA", "target_modules": ["q_proj"]}),
                         ("zero-r", {"peft_type": "LORA", "r": 0, "target_modules": ["q_proj"]})):
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_text(json.dumps(config))
        status, answer = post(served, "/v1/load_lora_adapter", json.dumps({"lora_name": name, "lora_path": name}).encode())
        assert status == 400 and answer["error"]["param"] == "lora_path", answer
    outside = make_adapter(served["folder"], tmp_path / "outside", seed=9)
    os.symlink(outside, root / "linked-folder")
    (root / "linked-files").mkdir()
    for file in os.listdir(outside):
        os.symlink(outside / file, root / "linked-files" / file)
    for name in ("linked-folder", "linked-files"):
        status, _ = post(served, "/v1/load_lora_adapter", json.dumps({"lora_name": name, "lora_path": name}).encode())
        assert status == 403
        with pytest.raises(openai.PermissionDeniedError):
            served["client"].chat.completions.create(model=name, messages=MESSAGES, max_tokens=2)


def test_adapters_load_by_name_on_first_use_and_the_least_recently_used_goes(served):
    client, engine = served["client"], served["engine"]
    for name in ("third", "spare", "third", "poet"):  # max_adapters 2
        assert client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=4).choices[0].message.content \
            == expected(served, 4, name)
    assert set(engine.adapters.names) == {"third", "poet"}  # spare was the least recently used
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nobody", messages=MESSAGES, max_tokens=2)


def test_idle_connections_are_closed_and_a_crowd_gets_answers_not_resets(served):
    with socket.create_connection(("127.0.0.1", served["port"]), timeout=10) as idle:
        time.sleep(served["api"].limits.keep_alive_seconds + 1.5)
        idle.settimeout(5)
        assert idle.recv(1) == b""  # closed by the server
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 2}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    statuses, start = [], threading.Barrier(80)

    def one():
        start.wait()
        try:
            statuses.append(status_of(send(served, request, timeout=120)))
        except OSError as e:
            statuses.append(e)

    threads = [threading.Thread(target=one) for _ in range(80)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(s, int) for s in statuses), [s for s in statuses if not isinstance(s, int)][:3]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses


def test_metrics_in_prometheus_text_and_request_ids(served):
    served["client"].chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, stream=True).close()
    stats, deadline = served["engine"].stats, time.monotonic() + 30
    while stats.finished + stats.cancelled + stats.failed < stats.requests and time.monotonic() < deadline:
        time.sleep(0.01)  # every request ended, the closed stream's too: no token decoded past the probe
    connection = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=30)
    connection.request("GET", "/metrics", headers={"X-Request-Id": "probe-1"})
    response = connection.getresponse()
    text = response.read().decode()
    assert response.getheader("X-Request-Id") == "probe-1"
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("fourbit_http_requests", "fourbit_time_to_first_token_seconds", "fourbit_inter_token_latency_seconds",
                 "fourbit_engine_waiting", "fourbit_engine_running", "fourbit_engine_decoded_tokens",
                 "fourbit_generation_tokens"):
        assert name in families, name
    decoded = [s.value for s in families["fourbit_engine_decoded_tokens"].samples if s.name.endswith("_total")]
    assert decoded and decoded[0] == served["engine"].stats.decoded_tokens


def test_an_adapter_that_a_request_holds_is_never_evicted(served):
    api = served["api"]  # max_adapters 2
    holds = [api.reserve(1, "spare"), api.reserve(1, "third")]  # both loaded now, and held
    try:
        assert {"spare", "third"} <= set(served["engine"].adapters.names)
        with pytest.raises(Exception, match="all 2 adapter slots are in use"):
            api.reserve(1, "poet")
        assert {"spare", "third"} <= set(served["engine"].adapters.names)
    finally:
        for hold in holds:
            hold.release()
    api.reserve(1, "poet").release()  # a slot frees once a hold ends
    assert "poet" in served["engine"].adapters.names
