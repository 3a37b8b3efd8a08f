"""Generation with the model core: batched (left padding), streamed, with stop tokens and strings.

`generate_token_ids` is the loop over ids; `stream_generate` turns it into text deltas per
row; `generate` collects finished completions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from qwenlab.errors import QwenlabError
from qwenlab.model.qwen2 import Qwen2ForCausalLM
from qwenlab.model.sampling import choose_next_tokens
from qwenlab.model.tokenizer import Tokenizer
from qwenlab.quant.memory import release_free_memory


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    max_context: int | None = None  # default: the model's max_position_embeddings
    truncate_prompt: bool = False  # drop the oldest prompt tokens instead of failing

    def validate(self) -> "GenerationConfig":
        if self.max_new_tokens < 0:
            raise QwenlabError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise QwenlabError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise QwenlabError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise QwenlabError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos or stop string) or "length"


@dataclass
class StreamEvent:
    row: int
    text: str
    finish_reason: str | None = None


def fit_prompts(prompts: list[list[int]], config: GenerationConfig, model_context: int) -> tuple[list[list[int]], int]:
    """Apply the context-window limit; returns the prompts and the KV cache capacity."""
    context = config.max_context or model_context
    longest = max(len(p) for p in prompts)
    if longest == 0:
        raise QwenlabError("empty prompt: at least one token is needed")
    if longest >= context:
        if not config.truncate_prompt:
            raise QwenlabError(f"prompt has {longest} tokens but the context window is {context}; "
                               "shorten it, raise --max-context, or pass --truncate")
        keep = max(1, context - max(1, config.max_new_tokens))
        prompts = [p[-keep:] for p in prompts]
        longest = max(len(p) for p in prompts)
    return prompts, min(context, longest + config.max_new_tokens)


PREFILL_TRIM_BYTES = 4 << 20
# Prompt tokens per prefill pass. The pass's buffers grow with its length (the MLP's gate|up output,
# T x 2I floats; attention scores, heads x T x S), so a long prompt goes through in chunks, each
# attending to the cache the earlier ones filled (chunked prefill, as vLLM does).
PREFILL_CHUNK = 128


@torch.inference_mode()
def generate_token_ids(model: Qwen2ForCausalLM, prompts: list[list[int]], config: GenerationConfig,
                       stop_ids: set[int]) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of each row (None once a row has hit a stop token).

    The caller may stop iterating at any time (stop strings, cancellation).
    """
    config.validate()
    prompts, capacity = fit_prompts(prompts, config, model.config.max_position_embeddings)
    batch, longest = len(prompts), max(len(p) for p in prompts)
    pad = 0
    tokens = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (longest - len(p)) + [True] * len(p) for p in prompts])
    # HF's convention for left padding: positions count real tokens only.
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool)
        seen.scatter_(1, tokens, valid)
    # Hand back the heap pages the last call's prefill freed: glibc keeps them, fragmented, and the
    # next prefill's buffers do not all fit in the holes, so the peak grew call after call (1.5B int4,
    # 128-token prompt: +12 MiB on the second call). Only where the prefill's largest buffer (the MLP's
    # gate|up output) is megabytes: a trim costs ~0.5-4 ms, 2% of a small model's whole call.
    if batch * longest * 2 * model.config.intermediate_size * 4 >= PREFILL_TRIM_BYTES:
        release_free_memory()
    cache = model.new_cache(batch, capacity)
    for begin in range(0, longest, PREFILL_CHUNK):  # a long prompt in chunks: bounded prefill buffers
        part = slice(begin, begin + PREFILL_CHUNK)
        logits = model(tokens[:, part], positions=positions[:, part], cache=cache, valid=valid[:, part],
                       last_only=True)
    logits = logits[:, -1]
    next_position = positions[:, -1:] + 1
    done = [False] * batch
    stop = torch.tensor(sorted(stop_ids)) if stop_ids else torch.empty(0, dtype=torch.long)
    one_valid = torch.ones(batch, 1, dtype=torch.bool)
    steps = capacity - longest
    for step_index in range(steps):
        next_tokens = choose_next_tokens(logits, temperature=config.temperature, top_k=config.top_k,
                                         top_p=config.top_p, repetition_penalty=config.repetition_penalty,
                                         seen=seen, generator=generator)
        is_stop = torch.isin(next_tokens, stop).tolist()
        step: list[int | None] = []
        for row, token in enumerate(next_tokens.tolist()):
            if done[row] or is_stop[row]:
                done[row] = True
                step.append(None)
            else:
                step.append(token)
        yield step
        if all(done) or step_index == steps - 1:
            return
        if seen is not None:
            seen.scatter_(1, next_tokens[:, None], True)
        logits = model(next_tokens[:, None], positions=next_position, cache=cache, valid=one_valid)[:, -1]
        next_position = next_position + 1


class _RowText:
    """Incremental detokenisation of one row, holding back text that may start a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token: int) -> tuple[str, bool]:
        """Returns (new text to emit, whether a stop string was hit)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
            return "", False
        self.text = text
        for s in self.stop:
            found = text.find(s, max(0, self.emitted - len(s)))
            if found != -1:
                self.text = text[:found]
                return self.flush(), True
        safe_end = max(self.emitted, len(text) - self.hold)
        delta = text[self.emitted:safe_end]
        self.emitted = safe_end
        return delta, False

    def flush(self) -> str:
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta


def stream_generate(model: Qwen2ForCausalLM, tokenizer: Tokenizer, prompts: list[list[int]],
                    config: GenerationConfig, stop_ids: set[int] | None = None,
                    results: list[Completion | None] | None = None) -> Iterator[StreamEvent]:
    """Stream text deltas per row; each row ends with one event carrying its finish_reason.

    If `results` is given (a list), it is filled with each row's Completion as the row finishes.
    """
    stop_ids = tokenizer.stop_ids() if stop_ids is None else stop_ids
    rows = [_RowText(tokenizer, tuple(config.stop)) for _ in prompts]
    finished: list[str | None] = [None] * len(prompts)
    if results is not None:
        results[:] = [None] * len(prompts)

    def finish(row: int, reason: str) -> StreamEvent:
        finished[row] = reason
        if results is not None:
            results[row] = Completion(rows[row].text, rows[row].ids, len(prompts[row]), reason)
        return StreamEvent(row, rows[row].flush(), reason)

    for step in generate_token_ids(model, prompts, config, stop_ids):
        for row, token in enumerate(step):
            if finished[row]:
                continue
            if token is None:
                yield finish(row, "stop")
                continue
            delta, hit_stop = rows[row].add(token)
            if delta:
                yield StreamEvent(row, delta)
            if hit_stop:
                yield finish(row, "stop")
        if all(finished):
            return
    for row in range(len(prompts)):
        if not finished[row]:
            yield finish(row, "length")


def generate(model: Qwen2ForCausalLM, tokenizer: Tokenizer, prompts: list[str], config: GenerationConfig,
             chat: bool = False, stop_ids: set[int] | None = None) -> list[Completion]:
    """Generate completions for several prompts in one batch (equal to generating one by one)."""
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    ids = [tokenizer.encode(p) for p in prompts]
    results: list[Completion | None] = []
    for _ in stream_generate(model, tokenizer, ids, config, stop_ids, results):
        pass
    return results  # type: ignore[return-value]
