"""Greedy grammar-constrained rows without a mask in advance: the argmax is offered to the grammar first,
and the mask is computed only when the grammar refuses it. The choice must equal the masked argmax, a
refused token must leave the grammar as it was, and a row must end the step its grammar completes."""

import random

import pytest
import torch

from qwenlab.serve.constrained import GREEDY_WALK, TokenMask, json_schema_grammar
from qwenlab.serve.requests import EngineRequest, SamplingParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99}}}


@pytest.fixture(scope="module")
def engine():
    from qwenlab.serve.registry import load_engine

    return load_engine("base", "nano", max_batch=4)


def masked_argmax(logits: torch.Tensor, mask: TokenMask) -> int:
    return int(logits.masked_fill(mask.banned(), float("-inf")).argmax())


def mask_with(engine, allowed: list[int]) -> TokenMask:
    backend = engine.grammars
    mask = TokenMask(backend, torch.zeros((backend.width + 31) // 32, dtype=torch.int32))
    for token in allowed:
        mask.words[token >> 5] |= 1 << (token & 31) if token & 31 != 31 else -(1 << 31)
    return mask


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_best_allowed_is_the_masked_argmax_on_every_path(engine, kernels, monkeypatch):
    """Argmax allowed; a few allowed tokens; many allowed with one among the top GREEDY_WALK; many allowed and
    none in the top; ties go to the lowest id. With the native kernels and without (QWENLAB_NATIVE=0's path)."""
    if kernels == "torch":
        monkeypatch.setattr(engine.grammars, "native_masked_argmax", None)
    rng, width = random.Random(0), engine.grammars.real_count
    for trial in range(300):
        logits = torch.randn(engine.grammars.width)
        order = logits.argsort(descending=True).tolist()
        kind = trial % 4
        if kind == 0:
            allowed = [order[0]] + rng.sample(range(width), 3)
        elif kind == 1:
            allowed = rng.sample(range(width), rng.randint(1, 6))
        elif kind == 2:
            allowed = [order[rng.randrange(1, GREEDY_WALK)]] + rng.sample(order[GREEDY_WALK:], 200)
        else:
            allowed = rng.sample(order[GREEDY_WALK:], 250)
        allowed = [t for t in allowed if t < width] or [order[-1] if order[-1] < width else 0]
        mask = mask_with(engine, allowed)
        assert mask.best_allowed(logits) == masked_argmax(logits, mask), (kind, allowed)
    logits = torch.zeros(engine.grammars.width)  # all tied: the lowest allowed id, as argmax gives
    mask = mask_with(engine, [7, 300, 41])
    assert mask.best_allowed(logits) == 7 == masked_argmax(logits, mask)


def test_padding_ids_are_never_allowed(engine):
    """An embedding padded past the tokenizer (Qwen2.5: 151,936 rows for ~151,665 tokens): a padding id is
    refused even if its bit were set, by the native argmax and in the unpacked mask."""
    from qwenlab.serve.constrained import GrammarBackend

    backend = GrammarBackend(engine.tokenizer, engine.tokenizer.vocab_size + 16, engine.stop_ids)
    mask = TokenMask(backend, torch.zeros((backend.width + 31) // 32, dtype=torch.int32))
    padding = backend.real_count + 3
    for token in (padding, 5):
        mask.words[token >> 5] |= 1 << (token & 31)
    assert mask.banned()[padding] and not mask.banned()[5]
    logits = torch.zeros(backend.width)
    logits[padding] = 10.0
    assert mask.best_allowed(logits) == 5


def test_a_refused_token_leaves_the_grammar_unchanged(engine):
    constraint = engine.grammars.compile(json_schema_grammar(SCHEMA), "response_format")
    grammar = constraint.row()
    tokenizer = engine.tokenizer
    assert not grammar.try_accept(tokenizer.encode("x")[0])  # a JSON object cannot start with x
    for token in tokenizer.encode('{"name": "ab", "age": 7}'):
        assert grammar.try_accept(token)
    assert grammar.complete()


@pytest.mark.parametrize("walk", [False, True], ids=["mask", "walk-then-mask"])
def test_checking_the_argmax_first_equals_masking_every_step(engine, monkeypatch, walk):
    """The same greedy request twice: checked first (no logprobs), and masked at every step (logprobs
    asked for, which needs the mask). Same tokens; the checked row ends the step its JSON closes. With
    `walk`, the next most likely tokens are offered before the mask, as for a 152k vocabulary. Forced
    tokens are off: they may spell the same text in other tokens (tested below)."""
    import json

    from qwenlab.serve import constrained
    from qwenlab.serve.requests import RowState

    walked = []
    if walk:
        monkeypatch.setattr(constrained, "WALK_FROM_TOKENS", 0)
        original_walk = constrained.RowGrammar.accept_likeliest

        def counting(self, logits):
            walked.append(original_walk(self, logits))
            return walked[-1]

        monkeypatch.setattr(constrained.RowGrammar, "accept_likeliest", counting)
    monkeypatch.setattr(engine.grammars, "force_tokens", False)

    outputs = []
    original = RowState.accept

    def recording(self, token, stop_ids, logprob=None):
        outputs[-1].append(token)
        return original(self, token, stop_ids, logprob)

    monkeypatch.setattr(RowState, "accept", recording)
    constraint = engine.grammars.compile(json_schema_grammar(SCHEMA), "response_format")
    steps_taken = []
    for prompt in ("Describe someone.", "alpha beta gamma", "What is 2+2?"):
        texts = []
        for logprobs in (None, 0):
            outputs.append([])
            events, done = [], []
            ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
            request = EngineRequest(ids, SamplingParams(max_tokens=60, logprobs=logprobs),
                                    lambda e: (events if e.kind == "delta" else done).append(e), constraint=constraint)
            engine.submit(request)
            steps = 0
            while not done:
                engine.step()
                steps += 1
            assert done[0].kind == "finish" and done[0].finish_reason == "stop", done[0]
            texts.append("".join(e.text for e in events))
            steps_taken.append((steps, len(outputs[-1])))
        assert outputs[-2] == outputs[-1], prompt
        assert texts[0] == texts[1]
        json.loads(texts[0])
        # the step that prefills also decodes, so n tokens take n - 1 steps; and the row ended on the token
        # that closed its JSON, not on a stop token chosen one step later
        assert steps_taken[-2] == (len(outputs[-2]) - 1, len(outputs[-2])), steps_taken[-2]
        assert outputs[-2][-1] not in engine.stop_ids
    if walk:  # the walk both found tokens and left some steps to the mask
        assert any(t is not None for t in walked) and None in walked
