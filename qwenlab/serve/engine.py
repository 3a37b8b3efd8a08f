"""Continuous batching over one model: requests join the running batch between decode steps.

Each `step()`:
  1. runs queued control commands (adapter load/unload) while no forward pass is in flight;
  2. drops cancelled rows (client gone, timeout);
  3. admits waiting requests into free rows: one left-padded prefill for all newcomers (each
     row with its own adapter), whose KV rows are then copied into the running BatchKVCache;
  4. runs one decode step for every running row (each row with its own adapter and position).
A row leaves the moment it finishes, and a waiting request takes its place at the next step.

`EngineLoop` is the single background thread that steps every engine (the base and each
variant), so the CPU cores are never split between two forward passes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable

import torch

from qwenlab.model.qwen2 import Qwen2ForCausalLM
from qwenlab.model.tokenizer import Tokenizer
from qwenlab.serve.adapters_bridge import AdapterSet
from qwenlab.serve.batch_cache import BatchKVCache
from qwenlab.serve.requests import EngineEvent, EngineRequest, RowState

log = logging.getLogger("qwenlab.serve")


class Engine:
    def __init__(self, name: str, model: Qwen2ForCausalLM, tokenizer: Tokenizer, stop_ids: set[int], *,
                 max_batch: int = 32, max_context: int = 2048, max_prefill_tokens: int = 1024, metrics=None):
        self.name, self.model, self.tokenizer, self.stop_ids = name, model, tokenizer, stop_ids
        self.max_batch, self.max_context, self.max_prefill_tokens = max_batch, max_context, max_prefill_tokens
        self.adapters = AdapterSet(model)
        self.path: str | None = None  # the folder it was loaded from (shown in /v1/models)
        self.metrics = metrics
        self.cache = BatchKVCache(model.config, max_batch, max_context, model.dtype)
        self.rows: list[RowState] = []  # rows[i] is cache row i
        self.waiting: deque[EngineRequest] = deque()
        self.commands: deque[tuple[Callable[[], object], Future]] = deque()
        self.lock = threading.Lock()
        self.wake: Callable[[], None] = lambda: None  # set by EngineLoop
        self.step_listeners: list[Callable[[], None]] = []  # called after every step (event delivery)

    # ---- called from the HTTP side (any thread) -------------------------------------------
    def submit(self, request: EngineRequest) -> None:
        with self.lock:
            self.waiting.append(request)
        self.wake()

    def call(self, function: Callable[[], object]) -> Future:
        """Run `function` on the engine thread between two steps (model surgery must not race a forward)."""
        future: Future = Future()
        with self.lock:
            self.commands.append((function, future))
        self.wake()
        return future

    def queue_depth(self) -> int:
        return len(self.waiting)

    def adapters_in_use(self) -> set[str]:
        with self.lock:
            pending = [r.adapter for r in self.waiting]
        return {a for a in pending + [row.request.adapter for row in self.rows] if a}

    # ---- the engine thread ------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.rows or self.waiting or self.commands)

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduling round; returns whether anything was done."""
        if not self.has_work():
            return False
        self._run_commands()
        self._drop_cancelled()
        newcomers = self._admit()
        if newcomers:
            try:
                self._prefill(newcomers)
            except Exception:  # they are in neither `waiting` nor `rows`: tell them before fail_all
                joined = {id(row.request) for row in self.rows}
                for request in newcomers:
                    if id(request) not in joined:
                        request.on_event(EngineEvent("error", "internal error in the generation engine"))
                raise
        if self.rows:
            self._decode()
        self._report()
        return True

    def _run_commands(self) -> None:
        while self.commands:
            with self.lock:
                function, future = self.commands.popleft()
            try:
                future.set_result(function())
            except Exception as e:  # the caller turns it into an HTTP error
                future.set_exception(e)

    def _drop_cancelled(self) -> None:
        for index in reversed(range(len(self.rows))):
            if self.rows[index].request.cancelled:
                self._remove(index)
                self._count("cancelled")

    def _admit(self) -> list[EngineRequest]:
        """Waiting requests for the free rows, within one prefill's token budget."""
        chosen: list[EngineRequest] = []
        longest = 0
        with self.lock:
            while self.waiting and len(self.rows) + len(chosen) < self.max_batch:
                request = self.waiting[0]
                if request.cancelled:
                    self.waiting.popleft()
                    self._count("cancelled")
                    continue
                if request.adapter and request.adapter not in self.adapters.known:
                    self.waiting.popleft()  # unloaded after the request was accepted
                    request.on_event(EngineEvent("error", f"adapter '{request.adapter}' was unloaded"))
                    continue
                longest_after = max(longest, len(request.prompt_ids))
                if chosen and longest_after * (len(chosen) + 1) > self.max_prefill_tokens:
                    break
                chosen.append(self.waiting.popleft())
                longest = longest_after
        return chosen

    def _prefill(self, requests: list[EngineRequest]) -> None:
        longest = max(len(r.prompt_ids) for r in requests)
        tokens = torch.tensor([[0] * (longest - len(r.prompt_ids)) + r.prompt_ids for r in requests])
        valid = torch.tensor([[False] * (longest - len(r.prompt_ids)) + [True] * len(r.prompt_ids) for r in requests])
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # RoPE counts real tokens only
        cache = self.model.new_cache(len(requests), longest)
        self.adapters.select([r.adapter for r in requests])
        logits = self.model(tokens, positions=positions, cache=cache, valid=valid, last_only=True)[:, -1]
        for index, request in enumerate(requests):
            self.cache.add_row(cache, index)
            self.rows.append(RowState(request, self.tokenizer, self.model.config.vocab_size))
        first = len(self.rows) - len(requests)
        self._choose_and_emit(logits, list(range(first, len(self.rows))))

    def _decode(self) -> None:
        self.cache.make_room(1)
        tokens = torch.tensor([[row.last_token] for row in self.rows])
        positions = torch.tensor([[row.position] for row in self.rows])
        valid = torch.ones(len(self.rows), 1, dtype=torch.bool)
        self.adapters.select([row.request.adapter for row in self.rows])
        started = time.perf_counter()
        logits = self.model(tokens, positions=positions, cache=self.cache, valid=valid)[:, -1]
        for row in self.rows:
            row.position += 1
        count = len(self.rows)
        self._choose_and_emit(logits, list(range(count)))
        if self.metrics is not None:
            self.metrics.observe_decode_step(self.name, count, time.perf_counter() - started)

    def _choose_and_emit(self, logits: torch.Tensor, row_indices: list[int]) -> None:
        """logits[i] belongs to self.rows[row_indices[i]]; finished rows leave the batch."""
        greedy = logits.argmax(dim=-1).tolist()
        finished: list[tuple[int, str]] = []
        for i, index in enumerate(row_indices):
            row = self.rows[index]
            token = greedy[i] if row.request.params.greedy else row.choose(logits[i:i + 1])
            first = row.request.first_token_s is None
            reason = row.accept(token, self.stop_ids)
            self._observe_token(row.request, first)
            if reason:
                finished.append((index, reason))
        if self.metrics is not None:
            self.metrics.observe_step_tokens(len(row_indices))
        for index, reason in sorted(finished, reverse=True):  # highest first: removal moves the last row
            self.rows[index].finish(reason)
            self._count(reason)
            self._remove(index)

    def _observe_token(self, request: EngineRequest, first: bool) -> None:
        if self.metrics is None:
            return
        self.metrics.observe_token(request.model_id)
        if first:
            self.metrics.observe_ttft(request.model_id, request.first_token_s - request.arrived_s)

    def _remove(self, index: int) -> None:
        moved = self.cache.remove_row(index)
        if moved is not None:
            self.rows[index] = self.rows[moved]
        self.rows.pop()

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_finish(self.name, reason)

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(self.name, queued=len(self.waiting), running=len(self.rows))

    def fail_all(self, message: str) -> None:
        """After an unexpected error: end every request with an error event and start clean."""
        with self.lock:
            requests = [row.request for row in self.rows] + list(self.waiting)
            self.waiting.clear()
        self.rows.clear()
        self.cache = BatchKVCache(self.model.config, self.max_batch, self.max_context, self.model.dtype)
        for request in requests:
            request.on_event(EngineEvent("error", message))


class EngineLoop(threading.Thread):
    """One background thread stepping every engine in turn; it sleeps when none has work."""

    def __init__(self, engines: list[Engine]):
        super().__init__(name="qwenlab-engine", daemon=True)
        self.engines = engines
        self._wake = threading.Event()
        self._stopping = False
        for engine in engines:
            engine.wake = self._wake.set

    def run(self) -> None:
        while not self._stopping:
            self._wake.clear()  # cleared before looking, so a submit during the round is never lost
            busy = False
            for engine in self.engines:
                try:
                    busy = engine.step() or busy
                except Exception:
                    log.exception("engine %s failed; its requests are ended with an error", engine.name)
                    engine.fail_all("internal error in the generation engine")
                for listener in engine.step_listeners:
                    listener()
            if not busy:
                self._wake.wait(timeout=1.0)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self.join(timeout=30)
