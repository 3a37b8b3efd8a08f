"""Grammar-constrained decoding with llguidance: JSON schemas (response_format) and forced tool calls.

One `GrammarBackend` per engine holds the llguidance tokenizer, built from the model's own
tokenizer.json with the logits' width (Qwen2.5 pads its embedding: 151,936 rows for ~151,665
tokens) and the engine's stop ids as end-of-sequence. A request's grammar is compiled and checked
on the HTTP side, so an unsupported schema feature is a 400 that names it; each batch row then gets
its own matcher.

Masks: llguidance fills one bit per token (`TokenMask`). A greedy row computes none in advance: its
argmax is offered to the grammar (then, with a large vocabulary, its next few most likely tokens), and
only when they are refused is the mask computed and the best allowed token found by a native pass over
the set bits (native/token_mask.cpp). A sampled row's next mask is computed in a worker thread while
the decode forward pass runs (llguidance and torch both release the GIL), or on the engine thread where
that costs less than the hand-off (INLINE_BELOW_S), unpacked through a 256-entry table into a bool row
the width of the logits and applied with one masked_fill. Ids past the tokenizer's own are always
banned (a padding id must never be sampled). A row whose grammar is complete ends at once, without the
decode step that could only choose a stop token. llguidance.torch's own apply function is not used: it is
torch.compile'd and took 38 s on its first CPU call.

Forced tokens: where the grammar leaves the next bytes no alternative (a schema's keys and punctuation, a
forced call's `<tool_call>` and name), llguidance gives their canonical tokens (`compute_ff_tokens`), asked
once after each token the model chose. A row takes them with no argmax check, no mask and no sampling
(in a batch one per step; alone, the whole run at once, fed in one forward pass: engine.py). The text is
the one the masked choice would write, and on nano a JSON row's ~46 tokens hold ~30 such (`"name": "`
alone is 9 tokens in its 400-token vocabulary). Rows that return logprobs keep the model's own choice,
whose logprob they report.
"""

from __future__ import annotations

import ctypes
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property

import torch

from qwenlab import native
from qwenlab.serve.limits import APIError

# Qwen2.5 writes JSON the way json.dumps does; no free whitespace, so a sampled row cannot loop on it.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
COMPILED_KEPT = 64
# Masks cheaper than this (all rows together) are computed on the engine thread before the forward pass.
# Handing them to the worker and back cost ~0.1 ms on nano (a thread wake-up each way), and on 2 cores
# the worker competes with the kernel's threads; a nano row's mask takes ~20 µs, a 0.5B row's (152k
# tokens) several times that, which the worker then hides behind a forward pass of ~10 ms.
INLINE_BELOW_S = 1e-4
# A greedy row whose argmax the grammar refuses offers it this many of its next most likely tokens (a
# refusal costs ~0.5 µs) before the mask is computed, when the vocabulary is large enough (WALK_FROM_TOKENS)
# for a mask to cost more than the walk: nano's 400-token mask took ~40 µs inside the engine (caches cold
# after the forward pass), the walk ~25 µs, and it found an allowed token one time in six.
GREEDY_WALK = 8
WALK_FROM_TOKENS = 32768
_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()  # byte -> its 8 bits, low first


class GrammarBackend:
    def __init__(self, tokenizer, logits_width: int, stop_ids: set[int]):
        self.tokenizer, self.width, self.stop_ids = tokenizer, logits_width, stop_ids
        self.real_tokens = torch.zeros(logits_width, dtype=torch.bool)
        self.real_count = min(tokenizer.vocab_size, logits_width)
        self.real_tokens[:self.real_count] = True
        self._workers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwenlab-masks")
        self._compiled: dict[str, Constraint] = {}  # clients repeat their schemas: check each once
        self._row_seconds = 0.0  # running mean of one row's mask time (the first masks are computed inline)
        self.force_tokens = True  # rows take forced tokens without the model's choice (False: masked every step)

    @cached_property
    def lltokenizer(self):
        import llguidance

        text = (self.tokenizer.folder / "tokenizer.json").read_text(encoding="utf-8")
        # a stop id past the tokenizer's own tokens (a config's eos over a smaller vocabulary) is banned anyway
        stops = sorted(i for i in self.stop_ids if i < self.tokenizer.vocab_size)
        return llguidance.LLTokenizer(text, n_vocab=max(self.width, self.tokenizer.vocab_size),
                                      eos_token=stops or None)

    def compile(self, grammar: str, param: str) -> "Constraint":
        """A checked grammar; an error names `param` and llguidance's reason (the unsupported keyword)."""
        import llguidance

        if grammar in self._compiled:
            return self._compiled[grammar]
        try:
            tokenizer = self.lltokenizer
        except Exception as e:  # e.g. a tokenizer that is not byte-level BPE
            raise APIError(400, f"{param}: constrained decoding is not available for this model's tokenizer "
                           f"({_one_line(str(e))})", code="unsupported_schema", param=param) from None

        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if failed:
            reason = _one_line(messages[0]) if messages else "invalid grammar"
            raise APIError(400, f"{param}: this server cannot enforce it: {reason}", code="unsupported_schema",
                           param=param)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise APIError(400, f"{param}: this server cannot enforce it: {_one_line(matcher.get_error())}",
                           code="unsupported_schema", param=param)
        if len(self._compiled) >= COMPILED_KEPT:
            self._compiled.pop(next(iter(self._compiled)))
        constraint = self._compiled[grammar] = Constraint(self, matcher)
        return constraint

    @cached_property
    def native_masked_argmax(self):
        """token_mask.cpp's entry point (buffers and lengths as arguments), or None without native kernels."""
        return native.library().masked_argmax if native.available() else None

    @cached_property
    def tool_tag_ids(self) -> dict[str, int]:
        """The ids of `<tool_call>` and `</tool_call>` where the tokenizer has each as one token."""
        ids = {tag: self.tokenizer.token_id(tag) for tag in ("<tool_call>", "</tool_call>")}
        return {tag: i for tag, i in ids.items() if i is not None and i < self.width}

    def masks(self, grammars: list["RowGrammar"]) -> Future:
        """Start computing each grammar's next mask; the future gives [allowed or error]. Off this thread,
        overlapping the forward pass, unless the masks are cheaper than the hand-off: then here, at once."""
        if len(grammars) * self._row_seconds < INLINE_BELOW_S:
            done = Future()
            done.set_result(self._timed_masks(grammars))
            return done
        return self._workers.submit(self._timed_masks, grammars)

    def _timed_masks(self, grammars: list["RowGrammar"]) -> list:
        # CPU time of this thread, not wall time: in the worker, waiting for the GIL or a core while the
        # forward pass runs would count, look expensive, and keep the masks off the engine thread for good
        started = time.thread_time()
        out = _all_masks(grammars)
        per_row = (time.thread_time() - started) / max(len(grammars), 1)
        self._row_seconds = 0.8 * self._row_seconds + 0.2 * per_row  # (a float store: safe across threads)
        return out


def _one_line(message: str) -> str:
    """llguidance's message on one line (a regex error spans several, with a ^^^ marker line)."""
    lines = [line.strip() for line in message.splitlines() if line.strip() and set(line.strip()) - set("^ ")]
    return "; ".join(lines)


def _all_masks(grammars: list["RowGrammar"]) -> list:
    out = []
    for grammar in grammars:
        try:
            out.append(grammar.allowed())
        except Exception as e:  # the row fails alone, on the engine thread
            out.append(e)
    return out


class Constraint:
    """A compiled grammar; `row()` gives a fresh matcher for one batch row (one per choice)."""

    def __init__(self, backend: GrammarBackend, matcher):
        self.backend, self._matcher = backend, matcher

    def row(self, forcing: bool = True) -> "RowGrammar":
        """forcing: the row takes the tokens the grammar forces without the model's choice (`take_forced`)."""
        return RowGrammar(self.backend, self._matcher.deep_copy(), forcing)


class TokenMask:
    """One row's allowed next tokens as llguidance wrote them: a bit per token id. A greedy row takes the
    best allowed token straight from the bits (`best_allowed`); a sampled row unpacks them (`banned()`)."""

    def __init__(self, backend: GrammarBackend, words: torch.Tensor):
        self.backend, self.words = backend, words
        # the native argmax's arguments, bound once: inside the engine, right after a forward pass, each
        # Python-level tensor op of this per-step path cost several µs (cold caches)
        self._words_at, self._found = words.data_ptr(), ctypes.c_int64(-1)
        self._found_at = ctypes.addressof(self._found)

    def best_allowed(self, logits: torch.Tensor) -> int:
        """The most likely allowed token of one row's logits [V]: a native pass over the mask's set bits, or
        (no native kernels, or logits it does not take) a masked argmax over the unpacked mask. Ties go to
        the lowest id on both paths."""
        kernel = self.backend.native_masked_argmax
        if kernel is not None and logits.dtype == torch.float32 and logits.is_contiguous():
            status = kernel(logits.data_ptr(), logits.numel(), self._words_at, self.words.numel(),
                            self.backend.real_count, self._found_at)
            if native.checked(status, "masked_argmax") == 0 and self._found.value >= 0:
                return self._found.value
        return int(logits.masked_fill(self.banned(), float("-inf")).argmax())

    def banned(self) -> torch.Tensor:
        """bool [logits width]: True where the grammar forbids the token (and for every padding id)."""
        bits = _BYTE_BITS[self.words.view(torch.uint8).long()].view(-1)[: self.backend.width]
        return ~(bits & self.backend.real_tokens)


class RowGrammar:
    def __init__(self, backend: GrammarBackend, matcher, forcing: bool = True):
        self.backend, self.matcher, self.forcing = backend, matcher, forcing and backend.force_tokens
        self.mask = TokenMask(backend, torch.zeros((backend.width + 31) // 32, dtype=torch.int32))
        # The tokens the grammar forces next, in order, not yet consumed (see the module's docstring).
        self.forced: list[int] = []
        self._refill_forced()

    def _refill_forced(self) -> None:
        # ~10-40 µs a call, so asked only after a token the model chose: a forced run, once taken, is
        # followed by a choice (its last byte could start several tokens, or it would have been forced too).
        if self.forcing:
            self.forced = self.matcher.compute_ff_tokens()[::-1]  # reversed: take_forced pops from the end

    def take_forced(self) -> int:
        """Consume and return the next forced token (only while `forced` is not empty)."""
        token = self.forced.pop()
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar refused its own forced token {token}: {self.matcher.get_error()}")
        return token

    def allowed(self) -> TokenMask:
        """The tokens the grammar allows next (a stop token once it is complete). The mask's buffer is this
        row's own and is rewritten by the next call: it is used within the step it was computed for."""
        words = self.mask.words
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        if self.matcher.is_error():
            raise RuntimeError(f"grammar: {self.matcher.get_error()}")
        return self.mask

    def try_accept(self, token: int) -> bool:
        """Consume `token` if the grammar allows it; False (and no change) if not. A padding id never is."""
        if token < self.backend.real_count and self.matcher.try_consume_tokens([token]) == 1:
            self._refill_forced()
            return True
        return False

    def accept_likeliest(self, logits: torch.Tensor) -> int | None:
        """After the argmax of `logits` [V] was refused: consume and return the likeliest allowed token among
        the GREEDY_WALK most likely, or None to leave it to the mask (always, for a small vocabulary).
        A tie with the next token also gives None: the masked argmax breaks ties by id, topk does not."""
        if self.backend.real_count < WALK_FROM_TOKENS:
            return None
        values, ids = logits.topk(GREEDY_WALK + 1)
        values, ids = values.tolist(), ids.tolist()
        for rank in range(1, GREEDY_WALK):
            if values[rank] == values[rank + 1]:
                return None
            if self.try_accept(ids[rank]):
                return ids[rank]
        return None

    def accept(self, token: int) -> None:
        """Consume a token the model chose (within the mask)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar refused token {token}: {self.matcher.get_error()}")
        self._refill_forced()

    def complete(self) -> bool:
        """The text so far is the whole grammar and it admits nothing more but a stop token: the row can end
        now, without a decode step that could only choose that stop token."""
        return self.matcher.is_stopped() and not self.matcher.is_error()


# ---- grammars from request fields ------------------------------------------------------------------
def json_schema_grammar(schema: dict) -> str:
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise APIError(400, f"response_format.json_schema.schema: {e}", param="response_format.json_schema.schema")


def tool_call_grammar(tools: list[dict], names: list[str], parallel: bool,
                      tag_ids: dict[str, int] | None = None) -> str:
    """Qwen2.5's tool-call text for the functions in `names`, each call's arguments held to its schema:
    `<tool_call>\\n{"name": "f", "arguments": {…}}\\n</tool_call>`, once (or several times, newline-separated,
    when parallel calls are allowed).

    tag_ids: the tokenizer's own ids of `<tool_call>` and `</tool_call>` (Qwen2.5 has one token each, and
    writes them so). A tag is then that token or its text spelled out: written as text alone, llguidance's
    mask offered only the tag's token while its matcher refused to consume it, so a forced call failed on
    the very token a Qwen2.5 model writes."""
    import llguidance

    def tag(text: str) -> str:
        token = (tag_ids or {}).get(text)
        return f"(<[{token}]> | {json.dumps(text)})" if token is not None else json.dumps(text)

    rules, choices = [], []
    for i, tool in enumerate(t for t in tools if t["name"] in names):
        schema = {**(tool.get("parameters") or {"type": "object"}), "x-guidance": JSON_OPTIONS}
        opening = f'\n{{"name": {json.dumps(tool["name"])}, "arguments": '
        rules.append(f"call_{i}: {tag('<tool_call>')} {json.dumps(opening)} args_{i} {json.dumps(chr(125) + chr(10))} "
                     f"{tag('</tool_call>')}")
        rules.append(f"args_{i}: %json {json.dumps(schema)}")
        choices.append(f"call_{i}")
    call = "call: " + " | ".join(choices)
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return llguidance.LLMatcher.grammar_from_lark("\n".join(["%llguidance {}", start, call, *rules]))
