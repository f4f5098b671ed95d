"""What ``GET /metrics`` shows, in Prometheus' text format (prometheus_client, a registry per server).

    fourbit_http_requests_total{route, status}      answered requests (unknown paths: route "other")
    fourbit_prompt_tokens_total, fourbit_generation_tokens_total
    fourbit_time_to_first_token_seconds             request received -> first piece of text (histogram)
    fourbit_inter_token_latency_seconds             between the pieces of one choice's text (histogram)
    fourbit_request_seconds                         request received -> a choice's last token (histogram)
    fourbit_engine_*                                the engine's counters (requests, finished, cancelled,
                                                    failed, timed out, tokens prefilled, reused from the
                                                    prefix cache and decoded, decode steps) and gauges
                                                    (waiting, running rows)

A "piece" is what the engine streams: usually one token, several when a token ends mid-character
or could begin a stop string.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .generate import Completion, Delta

ROUTES = {"/health", "/metrics", "/v1/models", "/tokenizer_info", "/tokenize", "/detokenize", "/v1/chat/completions",
          "/v1/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("fourbit_http_requests", "HTTP requests answered", ["route", "status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("fourbit_prompt_tokens", "Prompt tokens of answered choices", registry=self.registry)
        self.generation_tokens = Counter("fourbit_generation_tokens", "Tokens generated for answered choices",
                                         registry=self.registry)
        self.first_token = Histogram("fourbit_time_to_first_token_seconds", "Request received to first text",
                                     buckets=SECONDS, registry=self.registry)
        self.between_tokens = Histogram("fourbit_inter_token_latency_seconds", "Between streamed pieces of a choice",
                                        buckets=SECONDS, registry=self.registry)
        self.latency = Histogram("fourbit_request_seconds", "Request received to a choice's end", buckets=SECONDS,
                                 registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def tokens(self, completions: list[Completion]) -> None:
        self.prompt_tokens.inc(sum(c.prompt_tokens for c in completions))
        self.generation_tokens.inc(sum(len(c.token_ids) for c in completions))

    def timing(self, started: float) -> Timing:
        return Timing(self, started)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Timing:
    """One request's clock: each choice's first piece, the gaps after it, and its end."""

    def __init__(self, metrics: ServerMetrics, started: float):
        self.metrics, self.started, self.last = metrics, started, {}

    def seen(self, choice: object, item: object) -> None:
        now = time.perf_counter()
        if isinstance(item, Delta) and (item.text or item.finish_reason):
            if choice in self.last:
                self.metrics.between_tokens.observe(now - self.last[choice])
            else:
                self.metrics.first_token.observe(now - self.started)
            self.last[choice] = now
        elif isinstance(item, Completion):
            self.metrics.latency.observe(now - self.started)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        for name, value, text in (("requests", stats.requests, "Completions submitted"),
                                  ("finished", stats.finished, "Completions finished"),
                                  ("cancelled", stats.cancelled, "Completions cancelled by their caller"),
                                  ("failed", stats.failed, "Completions that failed"),
                                  ("timed_out", stats.timed_out, "Completions ended by their time limit"),
                                  ("prefilled_tokens", stats.prefilled_tokens, "Prompt tokens prefilled"),
                                  ("reused_tokens", stats.reused_tokens, "Prompt tokens taken from the prefix cache"),
                                  ("decoded_tokens", stats.decoded_tokens, "Tokens decoded"),
                                  ("steps", stats.steps, "Decode steps of the running batch")):
            yield CounterMetricFamily(f"fourbit_engine_{name}", text, value=value)
        yield GaugeMetricFamily("fourbit_engine_waiting", "Requests waiting for a row", value=stats.waiting)
        yield GaugeMetricFamily("fourbit_engine_running", "Rows in the running batch", value=stats.running)
