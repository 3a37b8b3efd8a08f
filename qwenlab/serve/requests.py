"""What the engine is asked to do (EngineRequest) and what it keeps per batch row (RowState)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from qwenlab.model.generate import _RowText  # incremental detokenisation + stop strings, shared with `generate`
from qwenlab.model.sampling import choose_next_tokens
from qwenlab.model.tokenizer import Tokenizer

_ids = itertools.count()


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 and self.repetition_penalty == 1.0


@dataclass
class EngineEvent:
    kind: str  # "delta", "finish" or "error"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class EngineRequest:
    """One generation. `on_event` is called from the engine thread; it must be thread-safe and quick."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[EngineEvent], None]
    adapter: str | None = None
    model_id: str = ""  # the name the client asked for (metrics label)
    request_id: int = field(default_factory=lambda: next(_ids))
    arrived_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    cancelled: bool = False  # set by the HTTP side (disconnect, timeout); read by the engine between steps

    def cancel(self) -> None:
        self.cancelled = True


class RowState:
    """A running request inside the batch: its text, its next input token and its RoPE position."""

    def __init__(self, request: EngineRequest, tokenizer: Tokenizer, vocab_size: int):
        self.request = request
        params = request.params
        self.text = _RowText(tokenizer, params.stop)
        self.position = len(request.prompt_ids)  # RoPE position of the next token fed in
        self.last_token = 0
        self.generated = 0
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool)
            self.seen[0, torch.tensor(request.prompt_ids)] = True

    def choose(self, logits: torch.Tensor) -> int:
        """Pick the next token from this row's logits [1, V] (non-greedy rows only)."""
        p = self.request.params
        token = int(choose_next_tokens(logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                       repetition_penalty=p.repetition_penalty, seen=self.seen,
                                       generator=self.generator)[0])
        if self.seen is not None:
            self.seen[0, token] = True
        return token

    def accept(self, token: int, stop_ids: set[int]) -> str | None:
        """Record a chosen token and emit its text; returns a finish reason when the row is done."""
        request, params = self.request, self.request.params
        self.generated += 1
        self.last_token = token
        if request.first_token_s is None:
            request.first_token_s = time.perf_counter()
        if token in stop_ids and not params.ignore_eos:
            return "stop"
        delta, hit_stop = self.text.add(token)
        if delta:
            request.on_event(EngineEvent("delta", delta))
        if hit_stop:
            return "stop"
        if self.generated >= params.max_tokens:
            return "length"
        return None

    def finish(self, reason: str) -> None:
        tail = self.text.flush()
        if self.text.stopped and reason == "length":
            reason = "stop"  # the held tail completed a stop string: the text ends there, as with a stop mid-way
        if tail:
            self.request.on_event(EngineEvent("delta", tail))
        self.request.on_event(EngineEvent("finish", finish_reason=reason, prompt_tokens=len(self.request.prompt_ids),
                                          completion_tokens=len(self.text.ids)))
