"""The serving engine: requests from many threads, decoded together by continuous batching.

A caller submits token ids, a Sampling and an adapter choice, and reads the answer from a queue
as it is decoded. One worker thread owns the model and repeats one iteration:

    retire    rows that finished, were cancelled (the client left), ran past their deadline, or
              whose adapter was unloaded leave the batch: each is answered (or dropped) alone
    admit     waiting requests take the free rows (up to ``max_batch``); a prompt whose beginning
              was computed before (the same system prompt, the conversation so far) takes those
              keys and values from the prefix cache (serve/prefix_cache.py) instead
    prefill   new rows' prompts (what the prefix cache did not have), at most ``prefill_chunk``
              tokens an iteration: short prompts together in one forward, a long one in chunks
              over several iterations, so that it never stalls the rows already decoding for
              more than one chunk
    join      a prefilled row chooses its first token and joins the running batch's KV cache
              (serve/kv_batch.py)
    decode    one token for every running row, each with its own sampling settings, seed and
              adapter (serve/adapters.py); a row whose sampling fails ends alone
              (a Llama-family model on a CPU decodes through serve/decode_step.py)

Requests that arrive while a prefill runs are prefilled in the same iteration while the
budget of ``prefill_chunk`` tokens lasts (a burst of requests starts together, not a decode step
apart). So a request waits for at most one chunk and one step before its prefill starts, and a
short request decodes next to long ones instead of after them. A row computes what it would alone
(its own positions, padding masked out), up to the float rounding of batched products. Adapter
changes (:meth:`Engine.load_adapter`, :meth:`Engine.unload_adapter`) run between iterations;
rows using an unloaded adapter end with an error, the others go on.

``dense_cache`` (default: on when the model is on a CPU) dequantizes the 4-bit weights once, for
the engine's lifetime, instead of at every decoded token, and prepacks them for oneDNN
(nn/linear4bit.py ``dense_weights``): on a CPU dequantizing, then the weight reorder of every
small product, dominated decoding; it costs the dense model's memory.
``prefix_cache`` is the most prompt tokens the prefix cache keeps (0: none); each costs
layers x 2 x kv_heads x head_dim values of the compute dtype (23 KB for SmolLM2-135M in bf16).
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..chat_templates import pad_id
from ..errors import InputError
from ..nn.linear4bit import dense_weights
from .adapters import AdapterSet
from .cache_keyword import cache_keyword, returned_cache
from .decode_step import DecodeStep, cache_supported
from .generate import Completion, Decoder, Delta, Sampling, eos_token_ids
from .kv_batch import KVBatch, joinable
from .prefix_cache import PrefixCache


class Cancelled(Exception):
    """A request's row was dropped because its caller cancelled it."""


@dataclass
class Ticket:
    """One submitted completion: its answer arrives on ``out``; :meth:`cancel` drops its row at
    the next iteration (what a server does when the client goes away)."""

    out: queue.Queue
    tag: object
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Stats:
    """Counters since the engine started (for /metrics, tests and benchmarks)."""

    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    timed_out: int = 0
    prefilled_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens taken from the prefix cache instead of prefilled
    decoded_tokens: int = 0
    steps: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)  # running rows -> decode steps
    waiting: int = 0
    running: int = 0

    def mean_batch(self) -> float:
        steps = sum(self.batch_sizes.values())
        return sum(size * count for size, count in self.batch_sizes.items()) / steps if steps else 0.0


@dataclass
class _Row:
    ticket: Ticket
    decoder: Decoder
    adapter: str | None
    deadline: float
    done: int = 0  # prompt tokens in its own cache (while prefilling)
    reused: int = 0  # of which taken from the prefix cache
    kv: KVBatch | None = None  # its own cache while prefilling in chunks
    logits: list[torch.Tensor] = field(default_factory=list)  # prompt logits, when it asked for them
    next_token: int | None = None  # chosen, not yet in the cache


class _Job:
    """Work handed to the worker thread; :meth:`result` waits for it and raises what it raised."""

    def __init__(self, change):
        self.change, self.error, self.done = change, None, threading.Event()

    def run(self) -> None:
        try:
            self.change()
        except BaseException as e:  # handed to the waiting caller
            self.error = e
        self.done.set()

    def result(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


class Engine:
    def __init__(self, model, tokenizer, adapters: AdapterSet | None = None, max_batch: int = 64,
                 prefill_chunk: int = 256, dense_cache: bool | None = None, request_seconds: float = 600.0,
                 prefix_cache: int = 4096, decode_step: bool = True):
        if max_batch < 1 or prefill_chunk < 1 or prefix_cache < 0:
            raise InputError(f"max_batch and prefill_chunk must be positive and prefix_cache at least 0, got {max_batch}, "
                             f"{prefill_chunk} and {prefix_cache}")
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self._cache_keyword = cache_keyword(model)  # (past_key_values before transformers 5.24)
        self.max_batch, self.prefill_chunk, self.request_seconds = max_batch, prefill_chunk, request_seconds
        self.device = next(model.parameters()).device
        self.eos, self.pad = eos_token_ids(model, tokenizer), pad_id(tokenizer)
        self._step = DecodeStep.of(model) if decode_step else None  # None: the model's own forward decodes
        if dense_cache is None:
            dense_cache = self.device.type == "cpu"
        self.stats = Stats()
        self.prefixes = PrefixCache(prefix_cache)
        self._loads = collections.Counter()  # adapter name -> times loaded: prefixes computed with it are its own
        self.lock = threading.Lock()  # held for an iteration, and by paused()
        self._arrived = threading.Condition()  # guards the queues below and _wanted
        self._wanted = 0  # callers waiting in paused()
        self._jobs: list[_Job] = []  # adapter changes, for the worker to run between iterations
        self._waiting: collections.deque[_Row] = collections.deque()
        self._prefilling: list[_Row] = []
        self._running: list[_Row] = []
        self._batch: KVBatch | None = None
        self._closing = False
        self._stopped = False  # the worker has returned (set under _arrived)
        self._dense = contextlib.ExitStack()  # the dense weights, entered and dropped by the worker
        started = _Job(lambda: self._dense.enter_context(dense_weights(model)) if dense_cache else None)
        self._worker = threading.Thread(target=self._work, args=(started,), name="fourbit-engine", daemon=True)
        self._worker.start()
        started.result()

    # -- the callers' side -----------------------------------------------------------------

    def submit(self, ids: list[int], sampling: Sampling, adapter: str | None = None, out: queue.Queue | None = None,
               tag: object = 0, seconds: float | None = None) -> Ticket:
        """Queue one completion: (tag, Delta)... then (tag, Completion) arrive on ``out`` (or
        (tag, exception) if it failed). Several submits may share one ``out``. ``seconds``: the
        most it may take from now (default ``request_seconds``); past it the row ends as "length"."""
        ticket = Ticket(out if out is not None else queue.Queue(), tag)
        decoder = Decoder(ids, sampling, self.tokenizer, self.eos)
        deadline = time.monotonic() + (self.request_seconds if seconds is None else seconds)
        with self._arrived:
            if self._closing:
                raise RuntimeError("the engine is shutting down and takes no new requests")
            self._waiting.append(_Row(ticket, decoder, adapter, deadline))
            self.stats.requests += 1
            self.stats.waiting = len(self._waiting)
            self._arrived.notify_all()
        return ticket

    def load_adapter(self, name: str, folder: str | os.PathLike) -> None:
        if self.adapters is None:
            raise InputError("this engine serves no adapters")

        def load():
            self._loads[name] += 1
            self.adapters.add(name, folder)

        self._on_worker(load)

    def unload_adapter(self, name: str) -> None:
        """Remove ``name``; rows using it end with an error at the next iteration, alone."""
        if self.adapters is None:
            raise KeyError(f"no adapter named {name!r} is loaded")

        def unload():
            self.adapters.remove(name)
            self.prefixes.drop(self._scope(name))

        self._on_worker(unload)

    def _on_worker(self, change) -> None:
        """Run ``change`` on the worker thread between two iterations, and wait for it."""
        job = _Job(change)
        with self._arrived:
            queued = not self._stopped
            if queued:  # the worker does not stop while a job waits
                self._jobs.append(job)
                self._arrived.notify_all()
        if not queued:  # it has stopped: no one else computes
            job.run()
        job.result()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the worker between two iterations for the duration of the block (a test computing
        on the same model, or submitting requests that must start in one iteration). The worker
        lets a caller in at the end of its current iteration: it does not take the next one while
        anyone waits."""
        with self._arrived:
            self._wanted += 1
        try:
            with self.lock:
                yield
        finally:
            with self._arrived:
                self._wanted -= 1
                self._arrived.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Take no more requests, finish the ones taken (drain), then stop the worker and drop
        the dense weights; ``timeout``: seconds to wait for the drain."""
        with self._arrived:
            self._closing = True
            self._arrived.notify_all()
        self._worker.join(timeout)

    # -- the worker ------------------------------------------------------------------------

    def _work(self, started: _Job) -> None:
        """The worker: all the model's computing happens on this one thread (see on_own_thread)."""
        try:
            started.run()
            if started.error is None:
                self._serve()
        finally:  # also when it failed
            with self._arrived:
                self._stopped = True
            self._dense.close()

    def _serve(self) -> None:
        while True:
            with self._arrived:
                while self._wanted or not (self._busy() or self._jobs):
                    if self._closing and not self._wanted and not self._busy() and not self._jobs:
                        self._stopped = True  # decided under the lock a job is queued under
                        return
                    self._arrived.wait()
                jobs, self._jobs = self._jobs, []
            with self.lock, torch.no_grad():
                for job in jobs:
                    job.run()
                if self._busy():
                    self._iteration()

    def _busy(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    def _iteration(self) -> None:
        self._retire()
        self._admit()
        budget = self._prefill(self.prefill_chunk)
        while budget > 0 and self._admit():  # arrived during that prefill: they start now, not after a step
            budget = self._prefill(budget)
        if self._running:
            try:
                self._decode()
            except Exception as e:  # the batched forward itself failed: no row can go on
                for row in self._running:
                    self._fail(row, e)
                self._running, self._batch = [], None
        self.stats.running = len(self._running)

    def _retire(self) -> None:
        now, loaded = time.monotonic(), set(self.adapters.names) if self.adapters is not None else set()
        for rows in (self._prefilling, self._running):
            for row in rows:
                if row.decoder.finish is not None:
                    continue
                if row.ticket.cancelled.is_set():
                    row.decoder.finish = "cancelled"
                    self.stats.cancelled += 1
                    row.ticket.out.put((row.ticket.tag, Cancelled("the request was cancelled")))
                elif row.adapter is not None and row.adapter not in loaded:
                    self._fail(row, InputError(f"adapter {row.adapter!r} was unloaded while the request ran"))
                elif now > row.deadline:
                    self.stats.timed_out += 1
                    self._emit(row, row.decoder.end("length"))
        self._prefilling = [r for r in self._prefilling if r.decoder.finish is None]
        kept = [i for i, r in enumerate(self._running) if r.decoder.finish is None]
        if len(kept) < len(self._running):
            self._running = [self._running[i] for i in kept]
            if kept:
                self._batch.keep(kept)
            else:
                self._batch = None

    def _admit(self) -> int:
        """Move waiting requests to free rows; how many came."""
        if self._batch is not None and not joinable(self._batch.cache):
            return 0  # a sliding-window cache: new rows start when this batch is done
        admitted = 0
        with self._arrived:
            while self._waiting and len(self._running) + len(self._prefilling) < self.max_batch:
                row = self._waiting.popleft()
                if row.ticket.cancelled.is_set():
                    self.stats.cancelled += 1
                    row.ticket.out.put((row.ticket.tag, Cancelled("the request was cancelled")))
                    continue
                if row.adapter is not None and (self.adapters is None or row.adapter not in self.adapters.names):
                    self._fail(row, InputError(f"no adapter named {row.adapter!r} is loaded"))
                    continue
                self._reuse_prefix(row)
                self._prefilling.append(row)
                admitted += 1
            self.stats.waiting = len(self._waiting)
        return admitted

    def _reuse_prefix(self, row: _Row) -> None:
        """Start ``row`` from the longest beginning of its prompt in the prefix cache, if any (not
        when it asked for the prompt's logprobs: those need the prompt's logits)."""
        if row.decoder.sampling.prompt_logprobs:
            return
        length, layers = self.prefixes.lookup(self._scope(row.adapter), row.decoder.prompt)
        if length:
            row.kv = KVBatch.of_row(layers)
            row.done = row.reused = length
            self.stats.reused_tokens += length

    def _scope(self, adapter: str | None) -> tuple[str | None, int]:
        return adapter, self._loads[adapter] if adapter is not None else 0

    def _prefill(self, budget: int) -> int:
        """Up to ``budget`` prompt tokens, first come first served: new rows whose prompts'
        rests fit, together in one forward; the first row that does not fit gets what is left
        of the budget as one chunk of its prompt (it goes on at the next iteration). Returns
        the budget left."""
        if self._batch is not None and not joinable(self._batch.cache):
            return 0
        group, chunked = [], None
        for row in self._prefilling:
            rest = len(row.decoder.prompt) - row.done
            if row.done == row.reused and rest <= budget:
                group.append(row)
                budget -= rest
            elif chunked is None and budget > 0:
                chunked, budget = (row, budget), 0
        if chunked:
            self._alone_failing([chunked[0]], self._prefill_chunk, *chunked)
        if group:
            self._alone_failing(group, self._prefill_together, group)
        self._prefilling = [r for r in self._prefilling if r.decoder.finish is None and r.next_token is None]
        return budget

    def _alone_failing(self, rows: list[_Row], prefill, *args) -> None:
        """``prefill(*args)``; if it fails, ``rows`` (those it was prefilling) fail, no others."""
        try:
            prefill(*args)
        except Exception as e:
            for row in rows:
                self._fail(row, e)

    def _prefill_together(self, rows: list[_Row]) -> None:
        """The rest of each row's prompt, left-padded, after the prefixes some took from the
        prefix cache (left-padded too): [pad][prefix][pad][rest], the padding masked out."""
        rests = [r.decoder.prompt[r.done:] for r in rows]
        longest = max(map(len, rests))
        ids = torch.tensor([[self.pad] * (longest - len(p)) + p for p in rests], device=self.device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in rests], device=self.device)
        past = KVBatch.stack([r.kv for r in rows]) if any(r.kv is not None for r in rows) else None
        if past is not None:
            mask = torch.cat([past.mask, mask], dim=1)
        echo = any(r.decoder.sampling.prompt_logprobs for r in rows)  # such rows took no prefix: all their prompt is here
        with self._route([r.adapter for r in rows]):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)[:, -longest:],
                             **{self._cache_keyword: past.cache if past is not None else None}, use_cache=True,
                             logits_to_keep=0 if echo else 1)
        self.stats.prefilled_tokens += sum(map(len, rests))
        for i, row in enumerate(rows):
            row.kv = None
            if row.decoder.sampling.prompt_logprobs:
                row.decoder.record_prompt_logprobs(out.logits[i, longest - len(row.decoder.prompt):])
        self._started(rows, KVBatch(returned_cache(out), mask), out.logits[:, -1].float())

    def _prefill_chunk(self, row: _Row, size: int) -> None:
        prompt, start = row.decoder.prompt, row.done
        chunk = prompt[start:start + size]
        end = start + len(chunk)
        echo = row.decoder.sampling.prompt_logprobs
        mask = torch.ones(1, end, dtype=torch.long, device=self.device)
        with self._route([row.adapter]):
            out = self.model(input_ids=torch.tensor([chunk], device=self.device), attention_mask=mask,
                             position_ids=torch.arange(start, end, device=self.device)[None],
                             **{self._cache_keyword: row.kv.cache if row.kv is not None else None}, use_cache=True,
                             logits_to_keep=0 if echo else 1)
        self.stats.prefilled_tokens += len(chunk)
        row.kv, row.done = KVBatch(returned_cache(out), mask), end
        if echo:
            row.logits.append(out.logits[0])
        if end == len(prompt):
            if echo:
                row.decoder.record_prompt_logprobs(torch.cat(row.logits))
                row.logits = []
            kv, row.kv = row.kv, None
            self._started([row], kv, out.logits[:, -1].float())

    def _started(self, rows: list[_Row], kv: KVBatch, logits: torch.Tensor) -> None:
        """Prefilled ``rows`` (the rows of ``kv``) choose their first tokens and join the batch;
        their prompts' keys and values go to the prefix cache."""
        if self.prefixes.capacity and joinable(kv.cache):
            for i, row in enumerate(rows):
                prompt = row.decoder.prompt
                if len(prompt) // self.prefixes.block > row.reused // self.prefixes.block:
                    tokens = kv.mask[i].nonzero().squeeze(1)  # its prompt's columns, in order
                    self.prefixes.store(self._scope(row.adapter), prompt,
                                        [(layer.keys[i][:, tokens], layer.values[i][:, tokens]) for layer in kv.cache.layers])
        self._choose(rows, logits)
        kept = [i for i, r in enumerate(rows) if r.decoder.finish is None]
        if not kept:
            return
        if len(kept) < len(rows):
            kv.keep(kept)
        if self._batch is None:
            self._batch = kv
        else:
            self._batch.join(kv)
        self._running += [rows[i] for i in kept]

    def _decode(self) -> None:
        rows, batch = self._running, self._batch
        ids = torch.tensor([[r.next_token] for r in rows], device=self.device)
        positions = batch.positions()
        with self._route([r.adapter for r in rows]):
            if self._step is not None and cache_supported(batch.cache):
                logits = self._step(ids, batch.grow(), positions, batch.cache)  # the cache grows in place
            else:
                out = self.model(input_ids=ids, attention_mask=batch.grow(), position_ids=positions,
                                 **{self._cache_keyword: batch.cache}, use_cache=True, logits_to_keep=1)
                batch.cache, logits = returned_cache(out), out.logits[:, -1]
        self.stats.steps += 1
        self.stats.batch_sizes[len(rows)] += 1
        self._choose(rows, logits.float())

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Each row's next token from its logits, taken by its decoder; a row that fails ends alone."""
        greedy = logits.argmax(-1).tolist()
        logprobs = torch.log_softmax(logits, dim=-1) if any(r.decoder.logprobs is not None for r in rows) else None
        for i, row in enumerate(rows):
            try:
                token = row.decoder.choose(logits[i], greedy[i])
                delta = row.decoder.advance(token, logprobs[i] if logprobs is not None else None)
            except Exception as e:
                self._fail(row, e)
                continue
            self.stats.decoded_tokens += 1
            row.next_token = token
            if delta is not None:
                self._emit(row, delta)

    def _emit(self, row: _Row, delta: Delta) -> None:
        row.ticket.out.put((row.ticket.tag, delta))
        if delta.finish_reason is not None:
            self.stats.finished += 1
            row.ticket.out.put((row.ticket.tag, row.decoder.completion()))

    def _fail(self, row: _Row, error: Exception) -> None:
        row.decoder.finish = "error"
        self.stats.failed += 1
        row.ticket.out.put((row.ticket.tag, error))

    def _route(self, choices: list[str | None]):
        if self.adapters is not None:
            return self.adapters.use(choices)
        if any(c is not None for c in choices):
            raise InputError("no adapters are loaded on this model")
        return contextlib.nullcontext()


def results(out: queue.Queue, count: int) -> Iterator[tuple[object, Delta | Completion]]:
    """Read ``out`` until ``count`` Completions have arrived; a failed or cancelled row's error is raised."""
    finished = 0
    while finished < count:
        tag, item = out.get()
        if isinstance(item, BaseException):
            raise item
        finished += isinstance(item, Completion)
        yield tag, item


def on_own_thread(work, *args):
    """``work(*args)`` on a thread of its own, which ends with it; its result, or what it raised.

    For loading the model a server will decode with: the engine computes on its worker thread,
    and every thread that runs torch's parallel CPU ops keeps a pool of OpenMP threads. With
    more of those than CPUs, libgomp (torch's OpenMP on Linux) stops spinning between parallel
    regions, and each small region pays a wake-up: a pool left on the main thread by loading
    made a 16-row decode step 1.75x slower on a 2-CPU machine (bench/RESULTS.md). A thread's
    pool ends with it.
    """
    box: dict = {}

    def run():
        try:
            box["result"] = work(*args)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=run, name="fourbit-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
