"""An HTTP server speaking the OpenAI API, for a 4-bit base and its adapters.

    fourbit serve SRC [--adapter name=DIR ...] [--host 127.0.0.1] [--port 8000] [--api-key K]

Routes (the OpenAI shapes, as vLLM and llama.cpp's server answer them):

    GET  /health                   200 once the model is loaded; never needs the key
    GET  /v1/models                the base (its served name) and every loaded adapter
    POST /v1/chat/completions      messages -> the chat template -> an answer; stream: SSE chunks;
                                   logprobs / top_logprobs (OpenAI's shape)
    POST /v1/completions           a prompt (a string, token ids, or a list of either) -> its
                                   continuation; stream: SSE chunks; echo and logprobs (the legacy
                                   shape: tokens, token_logprobs, top_logprobs, text_offset), what
                                   lm-evaluation-harness's local-completions model reads
    POST /tokenize, /detokenize    text or chat messages <-> token ids (vLLM's shapes)
    GET  /tokenizer_info           the special tokens and the chat template (vLLM's shape), so
                                   that lm-evaluation-harness tokenizes through the server
    POST /v1/load_lora_adapter     {"lora_name", "lora_path"}: only with --adapter-root, only a
    POST /v1/unload_lora_adapter   folder under that root, only safetensors (vLLM's routes)

The request's ``model`` names the base or an adapter. Requests are answered by the batching
engine (serve/engine.py): concurrent requests share forward passes. Every answer carries
``usage`` (prompt, completion and total tokens); ``stream_options.include_usage`` adds it as a
last chunk when streaming.

Safety: binds to 127.0.0.1 unless told otherwise. With an API key (--api-key or the
FOURBIT_API_KEY environment variable) every route but GET /health needs
``Authorization: Bearer <key>``, compared in constant time (hmac.compare_digest). Limits, each
answered at once with the OpenAI error shape: a body over ``max_body_bytes`` (413), a prompt
plus max_tokens beyond the model's context (400), more than ``max_concurrent`` requests in
flight (429), ``n`` over ``max_n`` or more than ``max_stop`` stop strings (400).
"""

from __future__ import annotations

import hmac
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .engine import Engine, results
from .generate import MAX_LOGPROBS, Completion, Sampling


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_concurrent: int = 64
    max_n: int = 8
    max_stop: int = 4
    max_stop_chars: int = 256
    default_max_tokens: int = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class OpenAIServer:
    """The routes' logic, independent of the HTTP plumbing (see :func:`make_http_server`)."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None = None, limits: Limits | None = None,
                 adapter_root: str | os.PathLike | None = None):
        self.engine, self.model_name = engine, model_name
        self.api_key = api_key
        self.limits = limits or Limits()
        self.adapter_root = Path(adapter_root).resolve() if adapter_root else None
        self.context = getattr(engine.model.config, "max_position_embeddings", None) or 2048
        self.created = int(time.time())
        self._in_flight = threading.BoundedSemaphore(self.limits.max_concurrent)

    # -- checks ------------------------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        if not self.api_key:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def slot(self):
        """A context holding one of max_concurrent places, or a 429 at once."""
        if not self._in_flight.acquire(blocking=False):
            raise APIError(429, f"more than {self.limits.max_concurrent} requests in flight; retry later",
                           kind="rate_limit_error", code="too_many_requests")
        return _Release(self._in_flight)

    # -- routes ---------------------------------------------------------------------------

    def models(self) -> dict:
        names = [self.model_name] + (self.engine.adapters.names if self.engine.adapters else [])
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": self.created, "owned_by": "fourbit",
             **({"parent": self.model_name} if n != self.model_name else {})} for n in names]}

    def chat_prompts(self, body: dict) -> list[list[int]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", param="messages")
        conversation = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
                raise APIError(400, f"messages[{i}] needs a role of system, developer, user or assistant", param="messages")
            content = message.get("content")
            if isinstance(content, list):  # content parts: only text is understood
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string or text parts", param="messages")
            role = "system" if message["role"] == "developer" else message["role"]
            conversation.append({"role": role, "content": content})
        tokenizer = self.engine.tokenizer
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return [tokenizer(text, add_special_tokens=False)["input_ids"]]

    def completion_prompts(self, body: dict) -> list[list[int]]:
        """``prompt``: a string, a list of strings, token ids, or a list of token-id lists."""
        prompt = body.get("prompt")
        vocab = len(self.engine.tokenizer)
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            prompts = [prompt]
        else:
            prompts = prompt
        ok = isinstance(prompts, list) and prompts and all(
            (isinstance(p, str) and p) or (isinstance(p, list) and p and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p)) for p in prompts)
        if not ok:
            raise APIError(400, "'prompt' must be a non-empty string, a list of them, token ids (each below the "
                                f"vocabulary size {vocab}), or a list of token-id lists", param="prompt")
        tokenizer = self.engine.tokenizer
        return [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]

    def sampling(self, body: dict, prompts: list[list[int]], chat: bool = False) -> tuple[Sampling, int]:
        limits = self.limits
        n = body.get("n", 1)
        if not isinstance(n, int) or not 1 <= n <= limits.max_n:
            raise APIError(400, f"'n' must be an integer from 1 to {limits.max_n}", param="n")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > limits.max_stop or not all(
                isinstance(s, str) and 0 < len(s) <= limits.max_stop_chars for s in stop):
            raise APIError(400, f"'stop' takes at most {limits.max_stop} non-empty strings of up to "
                                f"{limits.max_stop_chars} characters", param="stop")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise APIError(400, "'max_tokens' must be a positive integer", param="max_tokens")
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > self.context:
            raise APIError(400, f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {self.context} tokens", param="max_tokens", code="context_length_exceeded")
        logprobs, echo = _logprob_request(body, chat)
        try:
            sampling = Sampling(max_new_tokens=max_tokens, temperature=float(body.get("temperature", 1.0 if n > 1 else 0.0)),
                                top_p=float(body.get("top_p", 1.0)), top_k=int(body.get("top_k", 0)),
                                seed=body.get("seed"), stop=stop, logprobs=logprobs, prompt_logprobs=echo)
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e)) from None
        return sampling, n

    def adapter_for(self, body: dict) -> str | None:
        model = body.get("model", self.model_name)
        if model in (None, self.model_name):
            return None
        if self.engine.adapters is not None and model in self.engine.adapters.names:
            return model
        raise APIError(404, f"the model {model!r} does not exist; see GET /v1/models", param="model",
                       code="model_not_found")

    def run(self, prompts: list[list[int]], sampling: Sampling, n: int, adapter: str | None):
        """(choice index, Delta or Completion) for every choice, interleaved as decoded; the
        choices' rows are cancelled when the reader stops early (the client went away)."""
        out: queue.Queue = queue.Queue()
        tickets = []
        for prompt in prompts:
            for choice in range(n):  # with a seed, choice i draws from seed + i: n different answers
                settings = replace(sampling, seed=sampling.seed + choice) if sampling.seed is not None else sampling
                tickets.append(self.engine.submit(prompt, settings, adapter, out=out, tag=len(tickets)))
        try:
            yield from results(out, len(tickets))
        finally:
            for ticket in tickets:
                ticket.cancel()  # no-op for rows that finished

    def tokenize(self, body: dict) -> dict:
        """vLLM's /tokenize: a ``prompt`` string (``add_special_tokens``, default true) or chat
        ``messages`` (``add_generation_prompt``, default true) -> its token ids."""
        tokenizer = self.engine.tokenizer
        if "messages" in body:
            ids = self.chat_prompts(body)[0] if body.get("add_generation_prompt", True) else tokenizer(
                tokenizer.apply_chat_template(body["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
        elif isinstance(body.get("prompt"), str):
            ids = tokenizer(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))["input_ids"]
        else:
            raise APIError(400, "/tokenize takes a 'prompt' string or chat 'messages'", param="prompt")
        return {"count": len(ids), "max_model_len": self.context, "tokens": ids}

    def tokenizer_info(self) -> dict:
        """vLLM's /tokenizer_info: what a client needs to tokenize as the server does (the special
        tokens and the chat template); lm-evaluation-harness's API models then need no local copy."""
        tokenizer = self.engine.tokenizer
        return {"tokenizer_class": type(tokenizer).__name__, "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
                "chat_template": tokenizer.chat_template, "model_max_length": self.context}

    def detokenize(self, body: dict) -> dict:
        """vLLM's /detokenize: ``tokens`` (ids) -> the text."""
        tokens = body.get("tokens")
        vocab = len(self.engine.tokenizer)
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                   for t in tokens):
            raise APIError(400, f"'tokens' must be a list of token ids below {vocab}", param="tokens")
        return {"prompt": self.engine.tokenizer.decode(tokens)}

    def load_adapter(self, body: dict) -> dict:
        if self.adapter_root is None:
            raise APIError(403, "loading adapters at run time is off; start the server with --adapter-root DIR",
                           kind="permission_error")
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise APIError(400, "'lora_name' and 'lora_path' must be strings")
        folder = Path(path) if Path(path).is_absolute() else self.adapter_root / path
        folder = folder.resolve()
        if self.adapter_root not in (folder, *folder.parents):
            raise APIError(403, f"{path!r} is outside the adapter root", kind="permission_error", param="lora_path")
        if name == self.model_name:
            raise APIError(400, f"{name!r} is the base model's name", param="lora_name")
        if self.engine.adapters is None:
            raise APIError(400, "this server's engine holds no adapter set to load into")
        try:
            self.engine.load_adapter(name, folder)
        except (ValueError, FileNotFoundError) as e:
            raise APIError(400, str(e), param="lora_path") from None
        return {"object": "adapter", "id": name, "loaded": True}

    def unload_adapter(self, body: dict) -> dict:
        if self.adapter_root is None:
            raise APIError(403, "unloading adapters at run time is off; start the server with --adapter-root DIR",
                           kind="permission_error")
        name = body.get("lora_name")
        try:
            self.engine.unload_adapter(name)
        except KeyError as e:
            raise APIError(404, e.args[0], param="lora_name") from None
        return {"object": "adapter", "id": name, "loaded": False}


class _Release:
    def __init__(self, semaphore):
        self.semaphore = semaphore

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.semaphore.release()
        return False


def _logprob_request(body: dict, chat: bool) -> tuple[int | None, bool]:
    """(alternatives per token or None, echo) from a request: chat's ``logprobs: true`` and
    ``top_logprobs: N``, or completions' ``logprobs: N`` and ``echo``."""
    if chat:
        wanted, top = body.get("logprobs"), body.get("top_logprobs")
        if wanted not in (None, True, False) or (top is not None and not wanted):
            raise APIError(400, "'logprobs' is true or false; 'top_logprobs' needs logprobs true", param="logprobs")
        top = 0 if top is None else top
        if wanted and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_LOGPROBS):
            raise APIError(400, f"'top_logprobs' must be an integer from 0 to {MAX_LOGPROBS}", param="top_logprobs")
        return (top if wanted else None), False
    top, echo = body.get("logprobs"), body.get("echo", False)
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_LOGPROBS):
        raise APIError(400, f"'logprobs' must be an integer from 0 to {MAX_LOGPROBS}", param="logprobs")
    if not isinstance(echo, bool):
        raise APIError(400, "'echo' must be true or false", param="echo")
    if echo and body.get("stream"):
        raise APIError(400, "'echo' is not supported with 'stream'", param="echo")
    return top, echo and top is not None  # echo alone returns the prompt's text, not its log-probabilities


def completion_logprobs(tokenizer, completion: Completion, prompt: list[int]) -> dict | None:
    """The legacy completions ``logprobs`` object: ``tokens``, ``token_logprobs``, ``top_logprobs``
    (token -> log-probability) and ``text_offset``, over the echoed prompt tokens (the first has
    no log-probability: null) and then the generated ones."""
    if completion.logprobs is None:
        return None
    entries = list(zip(prompt, completion.prompt_logprobs)) if completion.prompt_logprobs is not None else []
    entries += [(e.token, e) for e in completion.logprobs]
    tokens, token_logprobs, top_logprobs, offsets, offset = [], [], [], [], 0
    for token, entry in entries:
        text = tokenizer.decode([token])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        token_logprobs.append(entry.logprob if entry is not None else None)
        top_logprobs.append({tokenizer.decode([t]): lp for t, lp in entry.top} if entry is not None else None)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(tokenizer, completion: Completion) -> dict | None:
    """Chat's ``logprobs``: ``content``, one {token, logprob, bytes, top_logprobs} per generated token."""
    if completion.logprobs is None:
        return None

    def item(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in completion.logprobs]}


def _usage(completions: list[Completion]) -> dict:
    prompt = sum(c.prompt_tokens for c in completions)
    completion = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fourbit"
    api: OpenAIServer  # set on the subclass by make_http_server

    def log_message(self, format, *args):  # quiet: one line per request is the caller's business
        pass

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def _handle(self, method: str) -> None:
        api = self.api
        try:
            if method == "GET" and self.path == "/health":
                return self._json(200, {"status": "ok"})
            if not api.authorized(self.headers.get("Authorization")):
                self._drain()
                raise APIError(401, "a valid API key is required: Authorization: Bearer <key>",
                               kind="authentication_error", code="invalid_api_key")
            if method == "GET" and self.path == "/v1/models":
                return self._json(200, api.models())
            if method == "GET" and self.path == "/tokenizer_info":
                return self._json(200, api.tokenizer_info())
            routes = {"/v1/chat/completions": self._completion, "/v1/completions": self._completion,
                      "/v1/load_lora_adapter": lambda body: self._json(200, api.load_adapter(body)),
                      "/v1/unload_lora_adapter": lambda body: self._json(200, api.unload_adapter(body)),
                      "/tokenize": lambda body: self._json(200, api.tokenize(body)),
                      "/detokenize": lambda body: self._json(200, api.detokenize(body))}
            if method != "POST" or self.path not in routes:
                self._drain()
                raise APIError(404, f"no route {method} {self.path}", code="not_found")
            routes[self.path](self._body())
        except APIError as e:
            self._json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:
            self._json(500, APIError(500, f"the request failed: {e}", kind="server_error").body())

    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= self.api.limits.max_body_bytes:
            self.rfile.read(length)
        elif length:
            self.close_connection = True

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.api.limits.max_body_bytes:
            self.close_connection = True
            raise APIError(413, f"the request body ({length} bytes) exceeds the limit of "
                                f"{self.api.limits.max_body_bytes} bytes", code="request_too_large")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    def _completion(self, body: dict) -> None:
        api = self.api
        chat = self.path == "/v1/chat/completions"
        with api.slot():
            prompts = api.chat_prompts(body) if chat else api.completion_prompts(body)
            sampling, n = api.sampling(body, prompts, chat)
            adapter = api.adapter_for(body)
            model = adapter or api.model_name
            ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            meta = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()), "model": model}
            events = api.run(prompts, sampling, n, adapter)
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return self._stream(events, meta, chat, include_usage)
            results: dict[int, Completion] = {}
            for index, item in events:
                if isinstance(item, Completion):
                    results[index] = item
            choices = []
            for index in sorted(results):
                c = results[index]
                tokenizer = api.engine.tokenizer
                if chat:
                    choices.append({"index": index, "message": {"role": "assistant", "content": c.text},
                                    "finish_reason": c.finish_reason, "logprobs": chat_logprobs(tokenizer, c)})
                else:
                    prompt = prompts[index // n]
                    text = (tokenizer.decode(prompt) + c.text) if body.get("echo") is True else c.text
                    choices.append({"index": index, "text": text, "finish_reason": c.finish_reason,
                                    "logprobs": completion_logprobs(tokenizer, c, prompt)})
            self._json(200, {**meta, "choices": choices, "usage": _usage(list(results.values()))})

    def _stream(self, events, meta: dict, chat: bool, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        kind = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}
        started: set[int] = set()
        completions = []
        try:
            for index, item in events:
                if isinstance(item, Completion):
                    completions.append(item)
                    continue
                choice = {"index": index, "finish_reason": item.finish_reason, "logprobs": None}
                if chat:
                    delta = {"content": item.text}
                    if index not in started:
                        delta["role"] = "assistant"
                        started.add(index)
                    choice["delta"] = delta
                else:
                    choice["text"] = item.text
                self._event({**kind, "choices": [choice]})
            if include_usage:
                self._event({**kind, "choices": [], "usage": _usage(completions)})
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as e:
            self._event(APIError(500, f"generation failed: {e}", kind="server_error").body())
        finally:
            events.close()  # a client that left: its rows are cancelled, not decoded to the end
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _event(self, payload: dict) -> None:
        self._chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def make_http_server(api: OpenAIServer, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A threaded HTTP server for ``api``; call ``serve_forever()`` (port 0 picks a free port)."""
    handler = type("Handler", (_Handler,), {"api": api})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
