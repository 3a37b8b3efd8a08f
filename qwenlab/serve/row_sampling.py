"""One batch row's next-token choice with the whole OpenAI sampling API, in this order:

  logits + logit_bias -> grammar mask -> [logprobs taken here] -> repetition penalty ->
  frequency/presence penalties -> temperature, top-k, top-p -> sample (argmax at temperature 0)

Logprobs are log_softmax of the logits the row may choose from (bias and grammar applied) before
penalties and temperature, as vLLM reports them by default. Penalties follow OpenAI's formula,
over this row's generated tokens only:

  logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty

A row's generator is seeded with `seed + choice index`, so n choices with one seed differ from
each other and repeat from call to call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenlab.model.generate import MAX_SEED
from qwenlab.model.sampling import choose_next_tokens


LOGPROB_FLOOR = -9999.0  # what a banned token's -inf is reported as (JSON has no infinity; vLLM's value)


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]  # the k most likely: (token, logprob, bytes)


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency: float,
                             presence: float) -> torch.Tensor:
    """OpenAI's penalties: logits - counts * frequency - (counts > 0) * presence."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


class RowSampler:
    def __init__(self, params, tokenizer, vocab_size: int, prompt_ids: list[int], index: int = 0):
        self.params, self.tokenizer = params, tokenizer
        seed = params.seed if params.seed is None or index == 0 else (params.seed + index) % (MAX_SEED + 1)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool)
            self.seen[0, torch.tensor(prompt_ids)] = True
        self.counts = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(1, vocab_size)
        self.bias = None
        if params.logit_bias:
            self.bias = torch.zeros(1, vocab_size)
            for token, value in params.logit_bias:
                self.bias[0, token] = value

    def choose(self, logits: torch.Tensor, banned: torch.Tensor | None) -> tuple[int, TokenLogprob | None]:
        """logits [1, V] -> (token, its logprob entry or None); banned: bool [V], the tokens a grammar forbids."""
        p = self.params
        logits = logits.float()
        if self.bias is not None:
            logits = logits + self.bias
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))
        logprobs = torch.log_softmax(logits, dim=-1) if p.logprobs is not None else None
        if self.counts is not None:
            logits = apply_frequency_presence(logits, self.counts, p.frequency_penalty, p.presence_penalty)
        token = int(choose_next_tokens(logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                       repetition_penalty=p.repetition_penalty, seen=self.seen,
                                       generator=self.generator)[0])
        self.record(token)
        return token, (self._entry(logprobs[0], token) if logprobs is not None else None)

    def record(self, token: int) -> None:
        """Count a chosen token for the penalties (also one a grammar forced, which no draw chose)."""
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1

    def _entry(self, logprobs: torch.Tensor, token: int) -> TokenLogprob:
        top = []
        if self.params.logprobs:
            values, ids = torch.topk(logprobs, min(self.params.logprobs, logprobs.shape[0]))
            for value, i in zip(values.tolist(), ids.tolist()):
                text, data = self._spelling(i)
                top.append((text, max(value, LOGPROB_FLOOR), data))
        text, data = self._spelling(token)
        return TokenLogprob(text, max(float(logprobs[token]), LOGPROB_FLOOR), data, top)

    def _spelling(self, token: int) -> tuple[str, list[int]]:
        """A token's text and its exact bytes (a byte-level token may hold part of a UTF-8 character)."""
        data = self.tokenizer.token_bytes(token)
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        return text, list(data if data is not None else text.encode("utf-8"))
