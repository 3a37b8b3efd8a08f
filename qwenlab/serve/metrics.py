"""Prometheus metrics (/metrics): TTFT histogram, tokens/s, queue depth, requests per variant.

Each server gets its own CollectorRegistry, so several apps in one process (tests) never clash.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class TokenRate:
    """Tokens per second over a sliding window (a Gauge read at scrape time)."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self.events: deque[tuple[float, int]] = deque()
        self.lock = threading.Lock()

    def add(self, tokens: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.events.append((now, tokens))
            self._trim(now)

    def rate(self) -> float:
        now = time.monotonic()
        with self.lock:
            self._trim(now)
            return sum(n for _, n in self.events) / self.window_s

    def _trim(self, now: float) -> None:
        while self.events and self.events[0][0] < now - self.window_s:
            self.events.popleft()


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("qwenlab_requests", "Generation requests accepted, per model id (base, adapter "
                                "or variant)", ["model", "endpoint"], registry=r)
        self.errors = Counter("qwenlab_http_errors", "Error responses, per HTTP status", ["status"], registry=r)
        self.finished = Counter("qwenlab_requests_finished", "Generations ended, per engine and reason",
                                ["engine", "reason"], registry=r)
        self.ttft = Histogram("qwenlab_time_to_first_token_seconds", "Arrival to first generated token",
                              ["model"], buckets=TTFT_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("qwenlab_prompt_tokens", "Prompt tokens prefilled", ["model"], registry=r)
        self.generated_tokens = Counter("qwenlab_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.step_seconds = Histogram("qwenlab_decode_step_seconds", "Duration of one batched decode step",
                                      ["engine"], registry=r)
        self.busy_seconds = Counter("qwenlab_engine_busy_seconds", "Time the engine thread spent in scheduling "
                                    "rounds that did work (prefill and decode), per engine", ["engine"], registry=r)
        self.batch_rows = Gauge("qwenlab_batch_rows", "Rows in the last decode step", ["engine"], registry=r)
        self.queue_depth = Gauge("qwenlab_queue_depth", "Requests waiting for a batch row", ["engine"], registry=r)
        self.running = Gauge("qwenlab_running_requests", "Requests in the running batch", ["engine"], registry=r)
        self.in_flight = Gauge("qwenlab_in_flight_requests", "Requests accepted and not yet answered", registry=r)
        self.rate = TokenRate()
        tokens_per_second = Gauge("qwenlab_generation_tokens_per_second",
                                  f"Tokens generated per second over the last {self.rate.window_s:g} s", registry=r)
        tokens_per_second.set_function(self.rate.rate)
        self.prefix_queried = Counter("qwenlab_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix "
                                      "cache, per engine", ["engine"], registry=r)
        self.prefix_hits = Counter("qwenlab_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix "
                                   "cache (not prefilled), per engine", ["engine"], registry=r)
        self._prefix_cache = None
        Gauge("qwenlab_prefix_cache_hit_rate", "Prompt tokens reused / prompt tokens looked up, since start",
              registry=r).set_function(lambda: self._prefix_cache.hit_rate() if self._prefix_cache else 0.0)
        Gauge("qwenlab_prefix_cache_cached_tokens", "Tokens whose KV the prefix cache holds now",
              registry=r).set_function(lambda: self._prefix_cache.cached_tokens if self._prefix_cache else 0)
        Gauge("qwenlab_prefix_cache_bytes", "Memory the prefix cache holds now",
              registry=r).set_function(lambda: self._prefix_cache.bytes if self._prefix_cache else 0)
        Gauge("qwenlab_prefix_cache_evicted_blocks", "Blocks evicted to stay under --prefix-cache-mb, since start",
              registry=r).set_function(lambda: self._prefix_cache.evicted_blocks if self._prefix_cache else 0)

    def watch_prefix_cache(self, cache) -> None:
        self._prefix_cache = cache

    # ---- called by the engine thread ----------------------------------------------------------
    def observe_ttft(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def observe_token(self, model: str) -> None:
        self.generated_tokens.labels(model).inc()

    def observe_decode_step(self, engine: str, rows: int, seconds: float) -> None:
        self.step_seconds.labels(engine).observe(seconds)
        self.batch_rows.labels(engine).set(rows)

    def observe_busy(self, engine: str, seconds: float) -> None:
        self.busy_seconds.labels(engine).inc(seconds)

    def observe_step_tokens(self, tokens: int) -> None:
        self.rate.add(tokens)

    def observe_prefix_lookup(self, engine: str, prompt_tokens: int, hit_tokens: int) -> None:
        self.prefix_queried.labels(engine).inc(prompt_tokens)
        self.prefix_hits.labels(engine).inc(hit_tokens)

    def observe_finish(self, engine: str, reason: str) -> None:
        self.finished.labels(engine, reason).inc()

    def set_load(self, engine: str, queued: int, running: int) -> None:
        self.queue_depth.labels(engine).set(queued)
        self.running.labels(engine).set(running)

    # ---- called by the HTTP side ---------------------------------------------------------------
    def observe_request(self, model: str, endpoint: str, prompt_tokens: int) -> None:
        self.requests.labels(model, endpoint).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)

    def observe_error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
