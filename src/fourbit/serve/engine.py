"""The batching engine: requests from many threads, answered in shared batches on one worker.

A caller submits token ids, a Sampling and an adapter choice and reads the answer from its own
queue as it is decoded. One worker thread owns the model: it takes the oldest waiting request,
waits ``gather_ms`` for more to arrive, and runs up to ``max_batch`` rows together through
serve/generate.py, each row with its own sampling settings and adapter (serve/adapters.py), so
concurrent requests share forward passes instead of queueing one behind another. A batch runs
until its last row finishes; requests that arrive meanwhile form the next batch.

Adapter changes (load, unload) take the same lock as a batch, so they happen between batches.

``dense_cache`` (default: on when the model is on a CPU) dequantizes the 4-bit weights once, for
the engine's lifetime, instead of at every decoded token (nn/linear4bit.py ``dense_weights``):
on a CPU that dequantization dominates decoding; it costs the dense model's memory.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import InputError
from ..nn.linear4bit import dense_weights
from .adapters import AdapterSet
from .generate import Completion, Delta, Generation, Sampling


@dataclass
class _Job:
    ids: list[int]
    sampling: Sampling
    adapter: str | None
    out: queue.Queue
    tag: object


class Engine:
    def __init__(self, model, tokenizer, adapters: AdapterSet | None = None, max_batch: int = 16,
                 gather_ms: float = 5.0, dense_cache: bool | None = None):
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        if dense_cache is None:
            dense_cache = next(model.parameters()).device.type == "cpu"
        self._dense = contextlib.ExitStack()
        if dense_cache:
            self._dense.enter_context(dense_weights(model))
        self.max_batch, self.gather = max_batch, gather_ms / 1e3
        self.lock = threading.Lock()  # held while a batch runs, and while adapters change
        self.batch_sizes: list[int] = []  # every batch's size, for tests and the benchmark
        self._waiting: queue.Queue[_Job] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="fourbit-engine", daemon=True)
        self._worker.start()

    def submit(self, ids: list[int], sampling: Sampling, adapter: str | None = None,
               out: queue.Queue | None = None, tag: object = 0) -> queue.Queue:
        """Queue one completion; (tag, Delta)... then (tag, Completion) arrive on ``out``
        (or (tag, exception) if generation failed). Several submits may share one ``out``."""
        out = out if out is not None else queue.Queue()
        self._waiting.put(_Job(list(ids), sampling, adapter, out, tag))
        return out

    def _work(self) -> None:
        while True:
            jobs = [self._waiting.get()]
            deadline = time.monotonic() + self.gather
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._waiting.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        with self.lock:
            self.batch_sizes.append(len(jobs))
            try:
                choices = [j.adapter for j in jobs]
                generation = Generation(self.model, self.tokenizer, [j.ids for j in jobs], [j.sampling for j in jobs],
                                        use_cache=True, eos_ids=None)
                with self.adapters.use(choices) if self.adapters is not None else _no_adapters(choices):
                    for delta in generation.steps():
                        job = jobs[delta.row]
                        job.out.put((job.tag, delta))
                        if delta.finish_reason is not None:
                            job.out.put((job.tag, generation.completion(delta.row)))
            except Exception as e:
                for job in jobs:
                    job.out.put((job.tag, e))


def results(out: queue.Queue, count: int) -> Iterator[tuple[object, Delta | Completion]]:
    """Read ``out`` until ``count`` Completions have arrived; a generation error is raised."""
    finished = 0
    while finished < count:
        tag, item = out.get()
        if isinstance(item, BaseException):
            raise item
        finished += isinstance(item, Completion)
        yield tag, item


@contextlib.contextmanager
def _no_adapters(choices):
    if any(c is not None for c in choices):
        raise InputError("no adapters are loaded on this model")
    yield
