"""Generation with the model core: batched (left padding), streamed, with stop tokens and strings.

`generate_token_ids` is the loop over ids; `stream_generate` turns it into text deltas per
row; `generate` collects finished completions.
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from qwenlab.errors import QwenlabError
from qwenlab.model.qwen2 import Qwen2ForCausalLM
from qwenlab.model.sampling import choose_next_tokens
from qwenlab.model.tokenizer import Tokenizer
from qwenlab.model.memory import release_free_memory


# Bounds that keep the sampling arithmetic finite: logits / temperature and logits / penalty stay far
# below float32's 3.4e38 for any logit a model produces (the server's schema uses the same bounds).
MIN_TEMPERATURE = 1e-5
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


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
        """Refuse values that would make the sampling arithmetic non-finite or meaningless."""
        def number(name: str, value, low: float, high: float = math.inf) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                shown = f"[{low:g}, {high:g}]" if high != math.inf else f">= {low:g}"
                raise QwenlabError(f"{name} must be a number {shown}, got {value!r}")

        for name in ("max_new_tokens", "top_k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise QwenlabError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        number("temperature", self.temperature, 0.0)
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / temperature would overflow float32
            raise QwenlabError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, "
                               f"got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise QwenlabError(f"top_p must be in (0, 1], got {self.top_p!r}")
        number("repetition_penalty", self.repetition_penalty, *REPETITION_PENALTY_RANGE)
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED):
            raise QwenlabError(f"seed must be an integer from 0 to 2**63-1, got {self.seed!r}")
        if self.max_context is not None and (not isinstance(self.max_context, int) or self.max_context < 1):
            raise QwenlabError(f"max_context must be an integer >= 1, got {self.max_context!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):  # "" would stop before the first token
            raise QwenlabError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
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
    if config.max_context is not None and config.max_context > model_context:
        # RoPE positions past the trained window give garbage, and the KV cache would be sized for it.
        raise QwenlabError(f"max_context {config.max_context} exceeds the model's context window "
                           f"({model_context} tokens, max_position_embeddings in config.json)")
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
# T x 2I floats: 37 MB on the 1.5B shape at 512, 78 MB on the 7B), so a longer prompt goes through in
# chunks, each attending to the cache the earlier ones filled (chunked prefill, as vLLM does). Not
# smaller: oneDNN's bf16/fp32 matmuls run far better on 512 rows than on 128 (0.5B shape, 512-token
# prompt: bf16 TTFT 0.68 -> 0.47 s, fp32 1.65 -> 1.49 s; int4's own kernel is the same either way).
PREFILL_CHUNK = 512


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
    # Identical prompts (n samples of one prompt: GRPO's groups) are prefilled once; their rows copy its KV cache.
    unique_index: dict[tuple[int, ...], int] = {}  # prompt -> its index among the distinct prompts
    first_rows, owners = [], []  # each distinct prompt's first row; each row's distinct prompt
    for row, prompt in enumerate(prompts):
        if tuple(prompt) not in unique_index:
            unique_index[tuple(prompt)] = len(first_rows)
            first_rows.append(row)
        owners.append(unique_index[tuple(prompt)])
    shared = len(first_rows) < batch
    prefill_rows, owner = torch.tensor(first_rows), torch.tensor(owners)
    cache = model.new_cache(len(prefill_rows), capacity)
    for begin in range(0, longest, PREFILL_CHUNK):  # a long prompt in chunks: bounded prefill buffers
        part = slice(begin, begin + PREFILL_CHUNK)
        logits = model(tokens[prefill_rows, part], positions=positions[prefill_rows, part], cache=cache,
                       valid=valid[prefill_rows, part], last_only=True)
    logits = logits[:, -1]
    if shared:
        cache, logits = cache.select_rows(owner), logits.index_select(0, owner)
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


class _Utf8Tail:
    """Whether a row's byte stream ends inside a UTF-8 character that the next bytes may complete.

    Python's incremental UTF-8 decoder with errors="replace" keeps exactly such a tail and turns
    bytes that can never be valid into U+FFFD at once, by the same rule (maximal subparts) as
    the `tokenizers` library's lossy decode; so its buffer says which trailing U+FFFD of
    `decode(ids)` is only provisional.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> bool | None:
        """Feed a token; True while a character is incomplete, None when the tokenizer is not byte-level."""
        data = self.tokenizer.token_bytes(token)
        if data is None:
            return None
        self.decoder.decode(data)
        return bool(self.decoder.getstate()[0])


class _RowText:
    """Incremental detokenisation of one row, holding back text that may start a stop string.

    The row's text is always the tokenizer's own `decode(ids)`, so the emitted deltas join up to
    exactly that (cut at a stop string). What may still change is held back: a last U+FFFD that
    stands for an incomplete UTF-8 character (the next token may complete it), and the last
    len(stop)-1 characters, which may begin a stop string. Bytes that can never be valid UTF-8 are
    emitted as U+FFFD as soon as that is known, and `flush` emits whatever is held at the end.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""  # decode(ids), cut at the stop string once one is found
        self.stopped = False
        self.hold = max((len(s) for s in stop), default=1) - 1
        self._tail = _Utf8Tail(tokenizer)

    def _stable_length(self, text: str, incomplete: bool | None) -> int:
        """How much of `text` no later token can change."""
        if text.endswith("\ufffd") and incomplete is not False:  # None: not byte-level, assume the worst
            return len(text) - 1
        return len(text)

    def _find_stop(self, text: str, end: int) -> int | None:
        """Where the first stop string inside text[:end] begins, searching only past what was emitted."""
        found = [i for s in self.stop if (i := text.find(s, max(0, self.emitted - len(s) + 1), end)) != -1]
        return min(found) if found else None

    def add(self, token: int) -> tuple[str, bool]:
        """Returns (new text to emit, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        self.ids.append(token)
        incomplete = self._tail.add(token)
        self.text = self.tokenizer.decode(self.ids)
        stable = self._stable_length(self.text, incomplete)
        found = self._find_stop(self.text, stable)
        if found is not None:
            self.text, self.stopped = self.text[:found], True
            return self.flush(), True
        safe_end = max(self.emitted, stable - self.hold)
        delta = self.text[self.emitted:safe_end]
        self.emitted = safe_end
        return delta, False

    def flush(self) -> str:
        """The rest of the text, at the end of the row: nothing is provisional any more."""
        if not self.stopped:
            found = self._find_stop(self.text, len(self.text))
            if found is not None:
                self.text, self.stopped = self.text[:found], True
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
        tail = rows[row].flush()  # before the Completion: flushing settles the text
        if rows[row].stopped:  # the last, settled characters completed a stop string
            reason = "stop"
        finished[row] = reason
        if results is not None:
            results[row] = Completion(rows[row].text, rows[row].ids, len(prompts[row]), reason)
        return StreamEvent(row, tail, reason)

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


def generate(model: Qwen2ForCausalLM, tokenizer: Tokenizer, prompts: list[str] | list[list[dict]],
             config: GenerationConfig, chat: bool = False, stop_ids: set[int] | None = None) -> list[Completion]:
    """Generate completions for several prompts in one batch (equal to generating one by one).

    A prompt is a string (with chat=True: one user turn in the chat template) or a conversation, a list of
    {"role", "content"} messages, rendered with the chat template."""
    prompts = [tokenizer.apply_chat_template(p) if isinstance(p, list)
               else tokenizer.apply_chat_template([{"role": "user", "content": p}]) if chat else p for p in prompts]
    ids = [tokenizer.encode(p) for p in prompts]
    results: list[Completion | None] = []
    for _ in stream_generate(model, tokenizer, ids, config, stop_ids, results):
        pass
    return results  # type: ignore[return-value]
