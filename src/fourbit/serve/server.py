"""An HTTP server speaking the OpenAI API, for a 4-bit base and its adapters, on FastAPI + uvicorn.

    fourbit serve SRC [--adapter name=DIR ...] [--host 127.0.0.1] [--port 8000] [--api-key K]

Routes (the OpenAI shapes, as vLLM and llama.cpp's server answer them):

    GET  /health                   200 once the model is loaded; never needs the key
    GET  /metrics                  Prometheus' text format: requests, tokens, queue, batch, latencies
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

The request's ``model`` names the base or an adapter; with ``--adapter-root``, an adapter not
loaded yet is loaded by that name from the root on first use, and the least recently used one
is unloaded when more than ``max_adapters`` are (never one a request is using). Requests are
answered by the continuous-batching engine (serve/engine.py). Every answer carries ``usage``;
``stream_options.include_usage`` adds it as a last chunk when streaming. Every response carries
an ``X-Request-Id`` (the client's, or a new one), also in the log lines.

Bounds, each answered with the OpenAI error shape: a body over ``max_body_bytes`` (413); a
request body that fails the schema (serve/openai_schema.py) or the limits (400); a prompt plus
max_tokens beyond the model's context (400); more than ``max_concurrent`` rows in flight, where
every prompt of a list times ``n`` is a row (429); a client that goes away cancels its rows at
the next decode step; a request longer than ``request_seconds`` ends as "length". uvicorn holds
the connections: at most ``max_connections`` (503 past it), idle ones and ones whose request
head has not arrived closed after ``keep_alive_seconds`` (serve/http_protocol.py), a listen
backlog of ``backlog``, and a graceful shutdown that lets the requests in flight finish.

Safety: binds to 127.0.0.1 unless told otherwise. With an API key (--api-key or the
FOURBIT_API_KEY environment variable) every route but GET /health needs
``Authorization: Bearer <key>``, compared in constant time (hmac.compare_digest). Adapter paths
are resolved (symlinks followed) and must stay inside the root, the files in them too.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import InputError
from .adapters import NAME as ADAPTER_NAME
from .engine import Engine, Ticket
from .generate import Completion, Sampling
from .http_protocol import HeadDeadlineProtocol
from .metrics import ServerMetrics
from .openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadAdapterRequest,
    TokenizeRequest,
    UnloadAdapterRequest,
)

log = logging.getLogger("fourbit.serve")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_concurrent: int = 64  # rows in flight: every prompt of a request times its n
    max_n: int = 8
    max_stop: int = 4
    max_stop_chars: int = 256
    default_max_tokens: int = 256
    request_seconds: float = 600.0
    max_connections: int = 256
    keep_alive_seconds: float = 5.0
    backlog: int = 2048
    max_adapters: int = 8
    graceful_seconds: float = 30.0


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class _Reservation:
    """Rows held against ``max_concurrent`` (and an adapter against eviction) until released."""

    def __init__(self, server: OpenAIServer, rows: int, adapter: str | None):
        self.server, self.rows, self.adapter, self.released = server, rows, adapter, False

    def release(self) -> None:
        with self.server._lock:
            if not self.released:
                self.released = True
                self.server._rows -= self.rows
                if self.adapter is not None:
                    self.server._in_use[self.adapter] -= 1


class OpenAIServer:
    """The routes' logic, independent of the HTTP plumbing (see :func:`make_app`)."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None = None, limits: Limits | None = None,
                 adapter_root: str | os.PathLike | None = None):
        self.engine, self.model_name = engine, model_name
        self.api_key = api_key
        self.limits = limits or Limits()
        self.adapter_root = Path(adapter_root).resolve() if adapter_root else None
        self.context = getattr(engine.model.config, "max_position_embeddings", None) or 2048
        self.created = int(time.time())
        self.metrics = ServerMetrics(engine)
        self._lock = threading.Lock()  # rows in flight, adapters in use, the pool's order
        self._rows = 0
        self._in_use: collections.Counter = collections.Counter()
        self._pool: collections.OrderedDict[str, None] = collections.OrderedDict()  # loaded from the root, LRU first
        self._loading = threading.Lock()

    # -- checks ------------------------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        if not self.api_key:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def reserve(self, rows: int, model: str | None = None) -> _Reservation:
        """Hold ``rows`` of ``max_concurrent`` (a 429 at once past it) and the adapter ``model``
        names (None or the base's name: none), loaded from the root on first use and kept from
        eviction until the reservation is released."""
        adapter = None if model in (None, self.model_name) else model
        if adapter is not None and not self._pin(adapter):
            folder = self._findable(adapter)
            with self._loading:  # loads and evictions happen one at a time, so what was loaded stays to be pinned
                if not self._pin(adapter):
                    self._load(adapter, folder, "model")
                    self._pin(adapter)
        with self._lock:
            if self._rows + rows > self.limits.max_concurrent:
                if adapter is not None:
                    self._in_use[adapter] -= 1
                raise APIError(429, f"this request needs {rows} rows and {self._rows} of {self.limits.max_concurrent} "
                                    "are in flight; retry later", kind="rate_limit_error", code="too_many_requests")
            self._rows += rows
        return _Reservation(self, rows, adapter)

    def _pin(self, adapter: str) -> bool:
        """Count one more request on ``adapter`` if it is loaded (the pool's most recent then)."""
        with self._lock:
            if self.engine.adapters is None or adapter not in self.engine.adapters.names:
                return False
            self._in_use[adapter] += 1
            if adapter in self._pool:
                self._pool.move_to_end(adapter)
            return True

    # -- routes ---------------------------------------------------------------------------

    def models(self) -> dict:
        names = [self.model_name] + (self.engine.adapters.names if self.engine.adapters else [])
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": self.created, "owned_by": "fourbit",
             **({"parent": self.model_name} if n != self.model_name else {})} for n in names]}

    def chat_prompts(self, request: ChatCompletionRequest) -> list[list[int]]:
        tokenizer = self.engine.tokenizer
        text = tokenizer.apply_chat_template(_conversation(request.messages), add_generation_prompt=True,
                                             tokenize=False)
        return [tokenizer(text, add_special_tokens=False)["input_ids"]]

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        """``prompt``: a string, a list of strings, token ids, or a list of token-id lists."""
        prompt = request.prompt
        prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        vocab = len(self.engine.tokenizer)
        if any(not isinstance(p, str) and max(p) >= vocab for p in prompts):
            raise APIError(400, f"token ids must be below the vocabulary size {vocab}", param="prompt")
        if any(p == "" for p in prompts):
            raise APIError(400, "a prompt must not be empty", param="prompt")
        return [self.engine.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]

    def sampling(self, request: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]],
                 chat: bool) -> tuple[Sampling, int]:
        limits, n = self.limits, request.n
        if n > limits.max_n:
            raise APIError(400, f"'n' must be an integer from 1 to {limits.max_n}", param="n")
        stop = request.stops()
        if len(stop) > limits.max_stop or not all(0 < len(s) <= limits.max_stop_chars for s in stop):
            raise APIError(400, f"'stop' takes at most {limits.max_stop} non-empty strings of up to "
                                f"{limits.max_stop_chars} characters", param="stop")
        max_tokens = (request.max_completion_tokens if chat else None) or request.max_tokens
        max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > self.context:
            raise APIError(400, f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {self.context} tokens", param="max_tokens", code="context_length_exceeded")
        if chat:
            logprobs, echo = (request.top_logprobs or 0) if request.logprobs else None, False
        else:  # echo alone returns the prompt's text, not its log-probabilities
            logprobs, echo = request.logprobs, request.echo and request.logprobs is not None
        temperature = request.temperature if request.temperature is not None else (1.0 if n > 1 else 0.0)
        sampling = Sampling(max_new_tokens=max_tokens, temperature=temperature, top_p=request.top_p,
                            top_k=max(request.top_k, 0), seed=request.seed, stop=stop, logprobs=logprobs,
                            prompt_logprobs=echo)
        return sampling, n

    def _findable(self, model: str) -> Path:
        """The folder under the root that holds the adapter ``model`` names, or a 404."""
        if self.engine.adapters is None or self.adapter_root is None or not ADAPTER_NAME.fullmatch(model):
            raise APIError(404, f"the model {model!r} does not exist; see GET /v1/models", param="model",
                           code="model_not_found")
        folder = self._inside_root(model, "model")
        if not (folder / "adapter_config.json").is_file():
            raise APIError(404, f"the model {model!r} does not exist (no adapter of that name under the adapter root)",
                           param="model", code="model_not_found")
        return folder

    def submit(self, prompts: list[list[int]], sampling: Sampling, n: int, adapter: str | None, out) -> list[Ticket]:
        """Every choice to the engine: choice i of a prompt draws from seed + i (n different answers)."""
        tickets = []
        for prompt in prompts:
            for choice in range(n):
                settings = replace(sampling, seed=sampling.seed + choice) if sampling.seed is not None else sampling
                tickets.append(self.engine.submit(prompt, settings, adapter, out=out, tag=len(tickets),
                                                  seconds=self.limits.request_seconds))
        return tickets

    def tokenize(self, request: TokenizeRequest) -> dict:
        """vLLM's /tokenize: a ``prompt`` string (``add_special_tokens``) or chat ``messages``
        (``add_generation_prompt``) -> its token ids."""
        tokenizer = self.engine.tokenizer
        if request.messages is not None:
            text = tokenizer.apply_chat_template(_conversation(request.messages),
                                                 add_generation_prompt=request.add_generation_prompt, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"]
        return {"count": len(ids), "max_model_len": self.context, "tokens": ids}

    def tokenizer_info(self) -> dict:
        """vLLM's /tokenizer_info: what a client needs to tokenize as the server does (the special
        tokens and the chat template); lm-evaluation-harness's API models then need no local copy."""
        tokenizer = self.engine.tokenizer
        return {"tokenizer_class": type(tokenizer).__name__, "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
                "chat_template": tokenizer.chat_template, "model_max_length": self.context}

    def detokenize(self, request: DetokenizeRequest) -> dict:
        """vLLM's /detokenize: ``tokens`` (ids) -> the text."""
        vocab = len(self.engine.tokenizer)
        if any(t >= vocab for t in request.tokens):
            raise APIError(400, f"'tokens' must be a list of token ids below {vocab}", param="tokens")
        return {"prompt": self.engine.tokenizer.decode(request.tokens)}

    def load_adapter(self, request: LoadAdapterRequest) -> dict:
        if self.adapter_root is None:
            raise APIError(403, "loading adapters at run time is off; start the server with --adapter-root DIR",
                           kind="permission_error")
        if request.lora_name == self.model_name:
            raise APIError(400, f"{request.lora_name!r} is the base model's name", param="lora_name")
        folder = self._inside_root(request.lora_path, "lora_path")
        with self._loading:
            self._load(request.lora_name, folder, "lora_path")
        return {"object": "adapter", "id": request.lora_name, "loaded": True}

    def unload_adapter(self, request: UnloadAdapterRequest) -> dict:
        if self.adapter_root is None:
            raise APIError(403, "unloading adapters at run time is off; start the server with --adapter-root DIR",
                           kind="permission_error")
        try:
            self.engine.unload_adapter(request.lora_name)
        except KeyError as e:
            raise APIError(404, e.args[0], param="lora_name") from None
        with self._lock:
            self._pool.pop(request.lora_name, None)
        return {"object": "adapter", "id": request.lora_name, "loaded": False}

    # -- the adapter pool -------------------------------------------------------------------

    def _inside_root(self, path: str, param: str) -> Path:
        """``path`` (relative to the root, or absolute) resolved, symlinks followed, with every
        file in it: all must stay inside the root."""
        folder = (Path(path) if Path(path).is_absolute() else self.adapter_root / path).resolve()
        inside = [folder] + (list(folder.iterdir()) if folder.is_dir() else [])
        for item in inside:
            resolved = item.resolve()
            if self.adapter_root not in (resolved, *resolved.parents):
                raise APIError(403, f"{path!r} leads outside the adapter root", kind="permission_error", param=param)
        return folder

    def _load(self, name: str, folder: Path, param: str) -> None:
        """Load ``name`` into the engine, first unloading the least recently used pool adapters
        that no request is using while the pool is full. The caller holds ``_loading``."""
        with self._lock:
            while len(self._pool) >= self.limits.max_adapters:
                idle = next((a for a in self._pool if not self._in_use[a]), None)
                if idle is None:
                    raise APIError(429, f"all {self.limits.max_adapters} adapter slots are in use; retry later",
                                   kind="rate_limit_error", code="too_many_requests")
                del self._pool[idle]
                self.engine.unload_adapter(idle)
        try:
            self.engine.load_adapter(name, folder)
        except (InputError, FileNotFoundError) as e:
            raise APIError(400, str(e), param=param) from None
        with self._lock:
            self._pool[name] = None



def _conversation(messages) -> list[dict]:
    """Chat messages for the template: OpenAI's "developer" role is the templates' "system"."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


def _validated(model: type[BaseModel], body: object) -> BaseModel:
    """The body as ``model``, or a 400 naming the first field at fault."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(part) for part in error["loc"] if not str(part).startswith(("function-", "list[")))
        message = error["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{where}: {message}" if where else message, param=where or None) from None


async def _json_body(request, limit: int) -> object:
    """The body, read up to ``limit`` bytes (413 past it, chunked or not), as JSON (400 if not)."""
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks).decode("utf-8") or "{}")
    except UnicodeDecodeError:
        raise APIError(400, "the body is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None


class _Inbox:
    """The engine's answers, handed from its worker thread to the request's event loop."""

    def __init__(self):
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

    def put(self, item) -> None:  # called by the engine's worker
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop has closed (the server stopped): no one is reading
            pass


def make_app(api: OpenAIServer):
    """The FastAPI application serving ``api``."""
    app = FastAPI(title="fourbit", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def frame(request: Request, call_next):
        given = request.headers.get("x-request-id", "")
        request.state.id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        started = time.perf_counter()
        if request.url.path != "/health" and not api.authorized(request.headers.get("authorization")):
            response = _error(APIError(401, "a valid API key is required: Authorization: Bearer <key>",
                                       kind="authentication_error", code="invalid_api_key"))
        else:
            response = await call_next(request)
        response.headers["X-Request-Id"] = request.state.id
        api.metrics.request(request.url.path, response.status_code)
        log.info("%s %s %s %d %.3fs", request.state.id, request.method, request.url.path, response.status_code,
                 time.perf_counter() - started)
        return response

    def _error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(APIError(e.status_code, f"no route {request.method} {request.url.path}" if code else str(e.detail),
                               code=code))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        log.exception("%s failed", getattr(request.state, "id", "?"))
        return _error(APIError(500, f"the request failed: {type(e).__name__}: {e}", kind="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        text, content_type = api.metrics.exposition()
        return PlainTextResponse(text, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return api.models()

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return api.tokenizer_info()

    async def body_as(request: Request, model: type[BaseModel]):
        return _validated(model, await _json_body(request, api.limits.max_body_bytes))

    def threaded(model: type[BaseModel], handler):  # the body checked, then the handler off the event loop
        async def route(request: Request):
            return await run_in_threadpool(handler, await body_as(request, model))
        return route

    for path, model, handler in (("/tokenize", TokenizeRequest, api.tokenize),
                                 ("/detokenize", DetokenizeRequest, api.detokenize),
                                 ("/v1/load_lora_adapter", LoadAdapterRequest, api.load_adapter),
                                 ("/v1/unload_lora_adapter", UnloadAdapterRequest, api.unload_adapter)):
        app.add_api_route(path, threaded(model, handler), methods=["POST"])

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, await body_as(request, ChatCompletionRequest), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, await body_as(request, CompletionRequest), chat=False)

    async def complete(request: Request, body, chat: bool):
        started = time.perf_counter()
        prompts = await run_in_threadpool(api.chat_prompts if chat else api.completion_prompts, body)
        sampling, n = api.sampling(body, prompts, chat)
        reservation = await run_in_threadpool(api.reserve, len(prompts) * n, body.model)
        adapter = reservation.adapter
        inbox = _Inbox()
        try:
            tickets = api.submit(prompts, sampling, n, adapter, inbox)
        except BaseException:
            reservation.release()
            raise
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + request.state.id, "created": int(time.time()),
                "object": "chat.completion" if chat else "text_completion", "model": adapter or api.model_name}
        timing = api.metrics.timing(started)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = _stream(inbox, tickets, reservation, timing, meta, chat, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            done = await _collect(request, inbox, len(tickets), timing)
        finally:
            for ticket in tickets:
                ticket.cancel()  # a no-op for the rows that finished
            reservation.release()
        return _answer(api, body, prompts, n, chat, meta, done)

    return app


async def _collect(request, inbox: _Inbox, count: int, timing) -> dict[int, Completion]:
    """Every choice's Completion; a failed row's error raised; the client's leaving noticed within a second."""
    done: dict[int, Completion] = {}
    while len(done) < count:
        try:
            tag, item = await asyncio.wait_for(inbox.queue.get(), timeout=1.0)
        except TimeoutError:
            if await request.is_disconnected():  # nginx's 499: no one reads it, the log and /metrics do
                raise APIError(499, "the client closed the request", kind="client_closed_request") from None
            continue
        timing.seen(tag, item)
        if isinstance(item, BaseException):
            raise _as_api_error(item)
        if isinstance(item, Completion):
            done[tag] = item
    return done


def _as_api_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, InputError):
        return APIError(400, str(error))
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", kind="server_error")


def _answer(api: OpenAIServer, body, prompts, n: int, chat: bool, meta: dict, done: dict[int, Completion]) -> dict:
    tokenizer, choices = api.engine.tokenizer, []
    for index in sorted(done):
        c = done[index]
        if chat:
            choices.append({"index": index, "message": {"role": "assistant", "content": c.text},
                            "finish_reason": c.finish_reason, "logprobs": chat_logprobs(tokenizer, c)})
        else:
            prompt = prompts[index // n]
            text = (tokenizer.decode(prompt) + c.text) if body.echo else c.text
            choices.append({"index": index, "text": text, "finish_reason": c.finish_reason,
                            "logprobs": completion_logprobs(tokenizer, c, prompt)})
    completions = list(done.values())
    api.metrics.tokens(completions)
    return {**meta, "choices": choices, "usage": _usage(completions)}


async def _stream(inbox: _Inbox, tickets: list[Ticket], reservation: _Reservation, timing, meta: dict, chat: bool,
                  include_usage: bool):
    """Server-sent events: a chunk per piece of text; [DONE] last. When the client goes away,
    Starlette cancels this generator: its rows are cancelled in ``finally``."""
    kind = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}
    started: set[int] = set()
    completions: list[Completion] = []
    try:
        while len(completions) < len(tickets):
            tag, item = await inbox.queue.get()
            timing.seen(tag, item)
            if isinstance(item, BaseException):
                yield _event(_as_api_error(item).body())
                break
            if isinstance(item, Completion):
                completions.append(item)
                continue
            choice = {"index": tag, "finish_reason": item.finish_reason, "logprobs": None}
            if chat:
                delta = {"content": item.text}
                if tag not in started:
                    delta["role"] = "assistant"
                    started.add(tag)
                choice["delta"] = delta
            else:
                choice["text"] = item.text
            yield _event({**kind, "choices": [choice]})
        if include_usage:
            yield _event({**kind, "choices": [], "usage": _usage(completions)})
        yield b"data: [DONE]\n\n"
    finally:
        for ticket in tickets:
            ticket.cancel()
        reservation.release()
        reservation.server.metrics.tokens(completions)


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


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




class HTTPServer:
    """uvicorn serving :func:`make_app` on a socket bound when this is made (port 0: a free
    one, in ``server_address``); :meth:`serve_forever` blocks, :meth:`shutdown` stops it after
    the requests in flight finish (at most ``graceful_seconds``)."""

    def __init__(self, api: OpenAIServer, host: str = "127.0.0.1", port: int = 8000):
        import uvicorn

        limits = api.limits
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=limits.backlog)
        self.server_address = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            make_app(api), http=HeadDeadlineProtocol, log_level="warning", access_log=False, lifespan="off",
            timeout_keep_alive=limits.keep_alive_seconds, limit_concurrency=limits.max_connections,
            backlog=limits.backlog, timeout_graceful_shutdown=limits.graceful_seconds,
        )
        self._server = uvicorn.Server(config)
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self, timeout: float | None = None) -> None:
        self._server.should_exit = True
        self._stopped.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def make_http_server(api: OpenAIServer, host: str = "127.0.0.1", port: int = 8000) -> HTTPServer:
    return HTTPServer(api, host, port)
