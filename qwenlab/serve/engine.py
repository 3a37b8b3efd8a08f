"""Continuous batching over one model: requests join the running batch between decode steps.

Each `step()`:
  1. runs queued control commands (adapter load/unload) while no forward pass is in flight;
  2. drops cancelled rows (client gone, timeout);
  3. admits waiting requests into free rows, oldest first: one left-padded prefill (each row with its
     own adapter) for a group that fits one chunk, or for one longer prompt (see _admit), run in
     chunks of PREFILL_CHUNK_TOKENS, one chunk per step, so the
     streams in flight get a decode step between chunks (chunked prefill); when it is done its KV
     rows are copied into the running BatchKVCache, once per choice (n > 1 shares the prefill);
  4. runs one decode step for every running row (each row with its own adapter and position),
     while a worker thread computes the next token masks of the grammar-constrained rows (a row whose next
     token the grammar forces needs none).
A row leaves the moment it finishes, and a waiting request takes its place at the next step.

Faults stay as small as they can: an exception while setting up, sampling or emitting one row ends
that row's request with an error event and the batch goes on; a failed prefill retries its
newcomers one at a time (the running rows never saw it); only a failed decode forward pass, which
may have written part of the shared KV cache, ends every running row - and the engine serves on.

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
from qwenlab.serve.constrained import GrammarBackend
from qwenlab.serve.prefix_cache import PrefixCache
from qwenlab.serve.requests import EngineEvent, EngineRequest, RowState

log = logging.getLogger("qwenlab.serve")
ROW_ERROR = "internal error while generating this request; other requests are unaffected"
ENGINE_ERROR = "internal error in the generation engine"
# Prompt tokens (rows x columns) per prefill chunk: what a running stream may wait for between two tokens.
PREFILL_CHUNK_TOKENS = 256
# The most forced tokens a row alone in the batch feeds in one forward pass.
MAX_FORCED_RUN = 64


class PrefillJob:
    """Newcomers' prompts, left-padded into one batch with a KV cache of its own, run a chunk at a time.

    states[i] are the choices of requests[i]: they share its prefilled KV row (copied once per choice).
    reused[i] is (count, kv) of requests[i]'s cached prefix (prefix_cache.PrefixCache.match), or (0, None).

    With reuse, only the uncached tails are computed. They are right-aligned into U columns, U the
    longest tail; a row whose tail is shorter recomputes the cached tokens that fall into those
    columns (so it reuses L - U of its L tokens). The reused KV sits in slots [R - reused, R) before
    them, R the most any row reuses:

        row 0: [. . k k | t t t]     k: reused KV, t: computed tokens, .: padding (masked)
        row 1: [k k k k | t t t]
    """

    def __init__(self, model, requests: list[EngineRequest], states: list[list[RowState]], chunk_tokens: int,
                 reused: list[tuple[int, torch.Tensor | None]] | None = None):
        self.requests, self.states = requests, states
        lengths = [len(r.prompt_ids) for r in requests]
        reused = reused or [(0, None)] * len(requests)
        tail = max(n - count for n, (count, _) in zip(lengths, reused))
        self.reused = [(max(0, n - tail), kv) for n, (_, kv) in zip(lengths, reused)]
        kept = max(count for count, _ in self.reused)
        self.longest = tail
        computed = [n - count for n, (count, _) in zip(lengths, self.reused)]
        self.tokens = torch.tensor([[0] * (tail - c) + r.prompt_ids[n - c:]
                                    for r, n, c in zip(requests, lengths, computed)])
        self.valid = torch.tensor([[False] * (tail - c) + [True] * c for c in computed])
        start = torch.tensor([count for count, _ in self.reused])[:, None]
        self.positions = start + (self.valid.long().cumsum(-1) - 1).clamp(min=0)  # RoPE counts real tokens only
        self.cache = model.new_cache(len(requests), kept + tail)
        if kept:
            self._place_reused(kept)
        self.chunk = max(16, chunk_tokens // len(requests))
        self.done = 0
        self.logits: torch.Tensor | None = None

    def _place_reused(self, kept: int) -> None:
        cache = self.cache
        for row, (count, kv) in enumerate(self.reused):
            if count:
                for layer in range(len(cache.keys)):
                    cache.keys[layer][row, :, kept - count:kept] = kv[layer, 0, :, :count]
                    cache.values[layer][row, :, kept - count:kept] = kv[layer, 1, :, :count]
                cache.valid[row, kept - count:kept] = True
        cache.length = kept
        cache.has_padding = not bool(cache.valid[:, :kept].all())

    def prompt_kv(self, row: int, start: int, end: int) -> torch.Tensor:
        """KV of requests[row]'s prompt tokens [start, end), [layers, 2, kv heads, end - start, head dim]."""
        first = self.cache.length - len(self.requests[row].prompt_ids)  # its tokens end at the last slot
        return torch.stack([torch.stack((k[row, :, first + start:first + end], v[row, :, first + start:first + end]))
                            for k, v in zip(self.cache.keys, self.cache.values)])

    def advance(self, model, adapters) -> bool:
        """Run the next chunk; True when the whole prompt is in (then `logits` holds each row's last)."""
        part = slice(self.done, self.done + self.chunk)
        adapters.select([r.adapter for r in self.requests])
        logits = model(self.tokens[:, part], positions=self.positions[:, part], cache=self.cache,
                       valid=self.valid[:, part], last_only=True)
        self.done = min(self.longest, self.done + self.chunk)
        if self.done < self.longest:
            return False
        self.logits = logits[:, -1]
        return True


class Engine:
    def __init__(self, name: str, model: Qwen2ForCausalLM, tokenizer: Tokenizer, stop_ids: set[int], *,
                 max_batch: int = 32, max_context: int = 2048, max_prefill_tokens: int = 1024, metrics=None,
                 prefix_cache: PrefixCache | None = None, lora_dtype: str = "auto"):
        self.name, self.model, self.tokenizer, self.stop_ids = name, model, tokenizer, stop_ids
        self.max_batch, self.max_context, self.max_prefill_tokens = max_batch, max_context, max_prefill_tokens
        self.adapters = AdapterSet(model, dtype=lora_dtype)
        self.path: str | None = None  # the folder it was loaded from (/v1/models shows its name only)
        self.metrics = metrics
        self.prefix_cache = prefix_cache  # shared with the other engines of the server (one budget); None: off
        self.cache = BatchKVCache(model.config, max_batch, max_context, model.dtype)
        self.rows: list[RowState] = []  # rows[i] is cache row i
        self.waiting: deque[EngineRequest] = deque()
        self.prefill_chunk_tokens = PREFILL_CHUNK_TOKENS
        self.prefilling: deque[PrefillJob] = deque()  # the head runs a chunk per step; a failed group is split
        self.grammars = GrammarBackend(tokenizer, model.config.vocab_size, stop_ids)
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
        pending += [r.adapter for job in list(self.prefilling) for r in job.requests]
        return {a for a in pending + [row.request.adapter for row in self.rows] if a}

    # ---- the engine thread ------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.rows or self.waiting or self.commands or self.prefilling)

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduling round; returns whether anything was done."""
        if not self.has_work():
            return False
        started = time.perf_counter()
        self._run_commands()
        self._drop_cancelled()
        if not (self.rows and self.rows[0].unfed > 1):  # else a forced run is fed first, alone (_advance)
            if not self.prefilling:
                newcomers = self._admit()
                if newcomers:
                    self._start_prefill(newcomers)
            if self.prefilling and self._advance_prefill() and self.rows:
                self.deliver()  # the newcomers' first tokens go out now, not with the decode step's second ones
        if self.rows:
            self._decode()  # a fault here reaches EngineLoop, which ends the running rows only
        self._report()
        if self.metrics is not None:  # busy time against wall time: what the HTTP side leaves the engine
            self.metrics.observe_busy(self.name, time.perf_counter() - started)
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
        """The next prefill's requests: the oldest waiting one, and those after it while the group, padded to
        its longest uncached tail, still fits one chunk (and --max-prefill-tokens).

        So a group finishes in the step it starts, and a prompt longer than a chunk is prefilled alone, a
        chunk per step: requests get their first token in arrival order (as vLLM's chunked prefill
        serves them), where one group of many would make each wait for all of them. A chat's clients
        that send their next turns together then see a first token after their own share of the work."""
        chosen: list[EngineRequest] = []
        longest = 0
        budget = min(self.prefill_chunk_tokens, self.max_prefill_tokens)
        with self.lock:
            while self.waiting and len(self.rows) + sum(r.params.n for r in chosen) + self.waiting[0].params.n \
                    <= self.max_batch:
                request = self.waiting[0]
                if request.cancelled:
                    self.waiting.popleft()
                    self._count("cancelled")
                    continue
                if request.adapter and request.adapter not in self.adapters.known:
                    self.waiting.popleft()  # unloaded after the request was accepted
                    self._tell(request, EngineEvent("error", f"adapter '{request.adapter}' was unloaded"))
                    continue
                longest_after = max(longest, self._uncached_length(request))
                if chosen and longest_after * (len(chosen) + 1) > budget:
                    break
                chosen.append(self.waiting.popleft())
                longest = longest_after
        return chosen

    def _start_prefill(self, requests: list[EngineRequest]) -> None:
        """Rows for the newcomers (one whose set-up fails ends alone) and a prefill job for those left,
        which reuses each prompt's cached prefix."""
        states = self._new_rows(requests)
        kept = [(r, s) for r, s in zip(requests, states) if s is not None]
        if kept:
            self.prefilling.append(PrefillJob(self.model, [r for r, _ in kept], [s for _, s in kept],
                                              self.prefill_chunk_tokens, [self._cached_prefix(r) for r, _ in kept]))

    # ---- the prefix cache -------------------------------------------------------------------------
    def namespace(self, adapter: str | None) -> tuple:
        """Whose KV this is: this engine's model, with this adapter as attached now (None: the base)."""
        return (self.name, adapter, self.adapters.versions.get(adapter) if adapter else None)

    def _uncached_length(self, request: EngineRequest) -> int:
        """The prompt tokens a prefill would compute: the budget of one prefill counts these only."""
        cached = 0 if self.prefix_cache is None else self.prefix_cache.cached_length(
            self.namespace(request.adapter), request.prompt_ids, len(request.prompt_ids) - 1)
        return len(request.prompt_ids) - cached

    def _cached_prefix(self, request: EngineRequest) -> tuple[int, torch.Tensor | None]:
        """(tokens, KV) of the request's longest cached prefix; the last prompt token is always computed
        (its logits choose the first token)."""
        if self.prefix_cache is None:
            return 0, None
        keys, kv = self.prefix_cache.match(self.namespace(request.adapter), request.prompt_ids,
                                           len(request.prompt_ids) - 1)
        count = 0 if kv is None else kv.shape[3]
        if self.metrics is not None:
            self.metrics.observe_prefix_lookup(self.name, len(request.prompt_ids), count)
        return count, kv

    def _cache_prompts(self, job: PrefillJob) -> None:
        if self.prefix_cache is None:
            return
        for index, request in enumerate(job.requests):
            self.prefix_cache.insert(self.namespace(request.adapter), request.prompt_ids,
                                     lambda start, end, index=index: job.prompt_kv(index, start, end))

    def _cache_row(self, index: int) -> None:
        """Before a finished row leaves: keep the KV of its prompt and what it generated, so a chat's next
        turn (which re-sends this answer) prefills only its new messages."""
        if self.prefix_cache is None:
            return
        row = self.rows[index]
        # the chosen tokens not yet fed in (the last, or a forced run's) have no KV
        tokens = row.request.prompt_ids + row.output_ids[:len(row.output_ids) - row.unfed]
        slots = self.cache.row_slots(index)
        if len(slots) != len(tokens):  # a bug guard: never cache KV that is not this sequence's
            log.warning("request %s: %d KV slots for %d tokens; not cached", row.request.request_id,
                        len(slots), len(tokens))
            return
        self.prefix_cache.insert(self.namespace(row.request.adapter), tokens,
                                 lambda start, end: self.cache.row_kv(index, slots[start:end]))

    def forget_adapter(self, name: str) -> None:
        """Detach an adapter and drop its cached KV (engine thread)."""
        namespace = self.namespace(name)
        self.adapters.detach(name)
        if self.prefix_cache is not None:
            self.prefix_cache.drop(namespace)

    def deliver(self) -> None:
        """Hand the events queued so far to their receivers (EngineLoop also does it after every step)."""
        for listener in self.step_listeners:
            try:
                listener()
            except Exception:  # e.g. the event loop closed during shutdown
                log.exception("a step listener of engine %s failed", self.name)

    def _advance_prefill(self) -> bool:
        """One chunk of the oldest prefill; True when it finished and its rows joined. If it fails, its
        requests are retried one by one, so only the culprit ends. A prefill writes a cache of its own:
        a failed one leaves the running rows untouched."""
        job = self.prefilling[0]
        try:
            finished = job.advance(self.model, self.adapters)
        except Exception:
            self.prefilling.popleft()
            if len(job.requests) == 1:
                self._fail_request(job.requests[0], "prefill")
                return False
            log.warning("a prefill of %d requests failed; retrying them one at a time", len(job.requests))
            for request, states, reused in reversed(list(zip(job.requests, job.states, job.reused))):
                self.prefilling.appendleft(PrefillJob(self.model, [request], [states], self.prefill_chunk_tokens,
                                                      [reused]))
            return False
        if not finished:
            return False
        self.prefilling.popleft()
        try:
            self._cache_prompts(job)
        except Exception:  # the cache is an optimisation: a fault in it must not fail the requests
            log.exception("caching the prompts of a prefill failed")
        self._join(job)
        return True

    def _join(self, job: PrefillJob) -> None:
        """Copy each prefilled row into the batch once per choice and choose every choice's first token."""
        first = len(self.rows)
        sources = []
        for index, (request, states) in enumerate(zip(job.requests, job.states)):
            if request.cancelled:
                self._count("cancelled")
                continue
            for state in states:
                self.cache.add_row(job.cache, index)
                self.rows.append(state)
                sources.append(index)
        if sources:
            self._choose_and_emit(job.logits[sources], list(range(first, len(self.rows))), self._first_masks(first))

    def _first_masks(self, first: int) -> dict[int, object]:
        rows = [row for row in self.rows[first:] if row.needs_mask()]
        if not rows:
            return {}
        return dict(zip(map(id, rows), self.grammars.masks([row.grammar for row in rows]).result()))

    def _new_rows(self, requests: list[EngineRequest]) -> list[list[RowState] | None]:
        """The RowStates (one per choice) of each request; one whose set-up fails (its seed, its prompt,
        its grammar) ends alone and gets None."""
        out = []
        for request in requests:
            try:
                out.append([RowState(request, self.tokenizer, self.model.config.vocab_size, index)
                            for index in range(request.params.n)])
            except Exception:
                self._fail_request(request, "set-up")
                out.append(None)
        return out

    def _decode(self) -> None:
        width = self.rows[0].unfed if len(self.rows) == 1 else 1  # a forced run: one row, alone (_advance)
        self.cache.make_room(width)
        if width == 1:
            tokens = torch.tensor([[row.last_token] for row in self.rows])
            positions = torch.tensor([[row.position] for row in self.rows])
        else:
            row = self.rows[0]
            tokens = torch.tensor([row.output_ids[-width:]])
            positions = torch.arange(row.position, row.position + width)[None]
        valid = torch.ones(len(self.rows), width, dtype=torch.bool)
        self.adapters.select([row.request.adapter for row in self.rows])
        started = time.perf_counter()
        constrained = [row for row in self.rows if row.needs_mask()]
        pending = self.grammars.masks([row.grammar for row in constrained]) if constrained else None
        logits = self.model(tokens, positions=positions, cache=self.cache, valid=valid, last_only=width > 1)[:, -1]
        # the masks were computed in a worker thread while the forward pass ran
        masks = dict(zip(map(id, constrained), pending.result())) if pending is not None else {}
        for row in self.rows:
            row.fed()
        count = len(self.rows)
        self._choose_and_emit(logits, list(range(count)), masks)
        if self.metrics is not None:
            self.metrics.observe_decode_step(self.name, count, time.perf_counter() - started)

    def _choose_and_emit(self, logits: torch.Tensor, row_indices: list[int], masks: dict[int, object]) -> None:
        """logits[i] belongs to self.rows[row_indices[i]]; masks[id(row)] is a constrained row's allowed
        tokens (or the error computing it raised); finished or faulted rows leave the batch."""
        greedy = logits.argmax(dim=-1).tolist()
        leaving: list[tuple[int, str | None]] = []  # (row index, finish reason; None: the row faulted)
        for i, index in enumerate(row_indices):
            try:
                reason = self._advance(self.rows[index], logits[i:i + 1], greedy[i], masks.get(id(self.rows[index])))
            except Exception:
                log.exception("request %s failed while sampling; only it is ended", self.rows[index].request.request_id)
                leaving.append((index, None))
                continue
            if reason:
                leaving.append((index, reason))
        if self.metrics is not None:
            self.metrics.observe_step_tokens(len(row_indices))
        for index, reason in sorted(leaving, reverse=True):  # highest first: removal moves the last row
            row = self.rows[index]
            if reason is not None:
                try:
                    self._cache_row(index)
                except Exception:
                    log.exception("request %s: caching its KV failed", row.request.request_id)
            self._remove(index)
            if reason is None or not self._finish(row, reason):
                self._tell(row.request, EngineEvent("error", ROW_ERROR))
                self._count("error")

    def _advance(self, row: RowState, logits: torch.Tensor, greedy_token: int, allowed) -> str | None:
        """Choose one row's next token and emit its text; its finish reason when it is done."""
        if isinstance(allowed, Exception):
            raise allowed
        token, logprob = (greedy_token, None) if row.simple else row.choose(logits, allowed, greedy_token)
        first = row.request.first_token_s is None
        reason = row.accept(token, self.stop_ids, logprob)
        self._observe_token(row.request, first)
        if reason is None and row.grammar is not None and row.grammar.forced and len(self.rows) == 1 \
                and not self.prefilling and not self.waiting:
            # Alone, a row takes its whole forced run now and the next step feeds it in one forward pass; in
            # a batch the other rows would need padding slots, so there it takes one forced token per step.
            # A newcomer arriving meanwhile joins one step later (step()).
            generated = row.generated
            reason = row.take_forced_run(self.stop_ids, MAX_FORCED_RUN)  # max_tokens bounds it too
            for _ in range(row.generated - generated):
                self._observe_token(row.request, False)
        return reason

    def _finish(self, row: RowState, reason: str) -> bool:
        """Send a row's last text and its finish event; False when that fails (then it gets an error)."""
        try:
            row.finish(reason)
        except Exception:
            log.exception("request %s failed while finishing", row.request.request_id)
            return False
        self._count(reason)
        return True

    def _fail_request(self, request: EngineRequest, stage: str) -> None:
        log.exception("request %s failed at %s; only it is ended", request.request_id, stage)
        self._tell(request, EngineEvent("error", ROW_ERROR))
        self._count("error")

    @staticmethod
    def _tell(request: EngineRequest, event: EngineEvent) -> None:
        """Deliver an event whatever the receiver does: a raising callback must not stop the engine."""
        try:
            request.on_event(event)
        except Exception:
            log.exception("request %s: its event callback failed", request.request_id)

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

    def fail_running(self, message: str) -> None:
        """After a fault in a shared pass: end the running rows with an error event and start a clean cache.

        Waiting requests stay queued: they had no part in it, and are admitted at the next step."""
        requests = list({id(row.request): row.request for row in self.rows}.values())
        self.rows.clear()
        self.cache = BatchKVCache(self.model.config, self.max_batch, self.max_context, self.model.dtype)
        for request in requests:
            self._tell(request, EngineEvent("error", message))
            self._count("error")


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
                busy = self._step(engine) or busy
            if not busy:
                self._wake.wait(timeout=1.0)

    @staticmethod
    def _step(engine: Engine) -> bool:
        """One engine's round; no exception leaves it, so the thread serves the next request."""
        busy = True
        try:
            busy = engine.step()
        except Exception:
            log.exception("engine %s failed; its running requests are ended with an error", engine.name)
            try:
                engine.fail_running(ENGINE_ERROR)
            except Exception:
                log.exception("engine %s could not reset", engine.name)
        engine.deliver()
        return busy

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self.join(timeout=30)
