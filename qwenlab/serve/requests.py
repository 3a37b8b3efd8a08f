"""What the engine is asked to do (EngineRequest) and what it keeps per batch row (RowState).

A request with n choices is one prefill and n batch rows; each row's events carry its choice index.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from qwenlab.model.generate import _RowText  # incremental detokenisation + stop strings, shared with `generate`
from qwenlab.model.tokenizer import Tokenizer
from qwenlab.serve.row_sampling import RowSampler, TokenLogprob

if TYPE_CHECKING:
    from qwenlab.serve.constrained import TokenMask

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
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely

    @property
    def greedy(self) -> bool:
        """Plain argmax over the raw logits: the batch's one argmax serves this row."""
        return (self.temperature <= 0 and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty and not self.logit_bias and self.logprobs is None)


@dataclass
class EngineEvent:
    kind: str  # "delta", "finish" or "error"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    index: int = 0  # the choice
    logprobs: list[TokenLogprob] | None = None  # one per token this delta's step chose


@dataclass
class EngineRequest:
    """One generation. `on_event` is called from the engine thread; it must be thread-safe and quick.

    constraint: a compiled grammar (constrained.Constraint) every choice must follow, or None."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[EngineEvent], None]
    adapter: str | None = None
    model_id: str = ""  # the name the client asked for (metrics label)
    constraint: object | None = None
    request_id: int = field(default_factory=lambda: next(_ids))
    arrived_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    cancelled: bool = False  # set by the HTTP side (disconnect, timeout); read by the engine between steps

    def cancel(self) -> None:
        self.cancelled = True


class RowState:
    """One choice of a running request inside the batch: its text, next input token and RoPE position."""

    def __init__(self, request: EngineRequest, tokenizer: Tokenizer, vocab_size: int, index: int = 0):
        self.request, self.index = request, index
        params = request.params
        self.text = _RowText(tokenizer, params.stop)
        self.position = len(request.prompt_ids)  # RoPE position of the next token fed in
        self.last_token = 0
        self.unfed = 0  # chosen tokens the next step feeds in: 1, or more after a forced run (see take_forced_run)
        self.generated = 0
        self.output_ids: list[int] = []  # every chosen token, a stop token included (the prefix cache's keys)
        self.sampler = RowSampler(params, tokenizer, vocab_size, request.prompt_ids, index)
        # a row that returns logprobs reports the model's own choice, so it takes no forced tokens
        self.grammar = request.constraint.row(forcing=params.logprobs is None) if request.constraint is not None else None
        self.simple = params.greedy and self.grammar is None  # the batch argmax is this row's choice
        self.checks_first = params.greedy and self.grammar is not None  # see choose(): no mask in advance
        self.masked_ahead = self.grammar is not None and not self.checks_first  # the engine computes its masks

    def needs_mask(self) -> bool:
        """Whether the engine computes this row's mask for the next step (a sampled constrained row whose
        next token is not forced)."""
        return self.masked_ahead and not self.grammar.forced

    def choose(self, logits: torch.Tensor, allowed: TokenMask | None,
               greedy_token: int | None = None) -> tuple[int, TokenLogprob | None]:
        """The next token from this row's logits [1, V], within the grammar's `allowed` tokens.

        greedy_token: the batch's argmax for this row. A greedy constrained row (`checks_first`) gets no
        mask in advance: its argmax is offered to the grammar, then (large vocabularies) its next most likely
        tokens, and only when the grammar refuses them is the mask computed and the likeliest allowed token
        taken. Both give the masked argmax; a model that writes the format anyway never pays for a mask
        (llama.cpp's grammar sampler does the same). A token the grammar forces (constrained.py) is taken
        before any of that, with no mask and no draw."""
        if self.grammar is not None and self.grammar.forced:
            return self._take_forced(), None
        if self.checks_first:
            if self.grammar.try_accept(greedy_token):
                return greedy_token, None
            token = self.grammar.accept_likeliest(logits[0])
            if token is None:
                token = self.grammar.allowed().best_allowed(logits[0])
                self.grammar.accept(token)
            return token, None
        token, logprob = self.sampler.choose(logits, allowed.banned() if allowed is not None else None)
        if self.grammar is not None:
            self.grammar.accept(token)
        return token, logprob

    def accept(self, token: int, stop_ids: set[int], logprob: TokenLogprob | None = None) -> str | None:
        """Record a chosen token and emit its text; returns a finish reason when the row is done."""
        request, params = self.request, self.request.params
        self.generated += 1
        self.last_token = token
        self.unfed += 1
        self.output_ids.append(token)
        if request.first_token_s is None:
            request.first_token_s = time.perf_counter()
        if token in stop_ids and (not params.ignore_eos or self.grammar is not None):
            return "stop"
        delta, hit_stop = self.text.add(token)
        if delta or logprob is not None:
            request.on_event(EngineEvent("delta", delta, index=self.index,
                                         logprobs=[logprob] if logprob is not None else None))
        if hit_stop or (self.grammar is not None and self.grammar.complete()):
            return "stop"
        if self.generated >= params.max_tokens:
            return "length"
        return None

    def take_forced_run(self, stop_ids: set[int], limit: int) -> str | None:
        """Choose now every token the grammar forces next (at most `limit`), emitting each; the next step
        feeds them all in one forward pass. Returns a finish reason if one of them ends the row."""
        reason = None
        while reason is None and self.grammar.forced and limit > 0:
            reason = self.accept(self._take_forced(), stop_ids)
            limit -= 1
        return reason

    def _take_forced(self) -> int:
        token = self.grammar.take_forced()
        self.sampler.record(token)  # no draw chose it, but the penalties count it
        return token

    def fed(self) -> None:
        """The step fed this row's unfed tokens in."""
        self.position += self.unfed
        self.unfed = 0

    def finish(self, reason: str) -> None:
        tail = self.text.flush()
        if self.text.stopped and reason == "length":
            reason = "stop"  # the held tail completed a stop string: the text ends there, as with a stop mid-way
        if tail:
            self.request.on_event(EngineEvent("delta", tail, index=self.index))
        self.request.on_event(EngineEvent("finish", finish_reason=reason, prompt_tokens=len(self.request.prompt_ids),
                                          completion_tokens=len(self.text.ids), index=self.index))
