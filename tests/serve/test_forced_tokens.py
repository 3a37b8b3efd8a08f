"""Forced tokens: where a grammar leaves the next bytes no alternative, a row takes llguidance's tokens for
them without the model's choice. Alone in the batch it feeds a whole forced run in one forward pass; in a
batch, one per step. Every token the model did choose must still be the masked argmax of a plain forward
pass over the whole sequence, and the run's KV must be the KV of those tokens."""

import json
import logging

import pytest
import torch

from qwenlab.serve.constrained import RowGrammar, json_schema_grammar
from qwenlab.serve.requests import EngineRequest, SamplingParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}}}
PROMPTS = ("Describe someone.", "alpha beta gamma", "What is 2+2?")


def make_engine(**kwargs):
    from qwenlab.serve.registry import load_engine

    return load_engine("base", "nano", max_batch=4, **kwargs)


@pytest.fixture(scope="module")
def engine():
    return make_engine()


@pytest.fixture
def forced_log(monkeypatch):
    """Every forced token taken, per grammar: {id(grammar): [token, ...]}."""
    taken: dict[int, list[int]] = {}
    original = RowGrammar.take_forced

    def recording(self):
        token = original(self)
        taken.setdefault(id(self), []).append(token)
        return token

    monkeypatch.setattr(RowGrammar, "take_forced", recording)
    return taken


def prompt_ids(engine, prompt: str) -> list[int]:
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))


def submit(engine, ids, constraint=None, **params):
    out = {"events": [], "done": []}
    request = EngineRequest(ids, SamplingParams(**{"max_tokens": 60, **params}),
                            lambda e: (out["events"] if e.kind == "delta" else out["done"]).append(e),
                            constraint=constraint)
    engine.submit(request)
    return out


def run_alone(engine, ids, constraint, **params):
    """(output ids, text, steps, the row's grammar) of one request alone in the engine."""
    out = submit(engine, ids, constraint, **params)
    engine.step()
    row = engine.rows[0] if engine.rows else None
    steps = 1
    while not out["done"]:
        engine.step()
        steps += 1
    assert out["done"][0].kind == "finish", out["done"][0]
    return row, "".join(e.text for e in out["events"]), steps


def test_a_row_alone_feeds_forced_runs_whole_and_still_chooses_the_masked_argmax(engine, forced_log):
    """Replay against one plain forward pass over prompt + output: each token the model chose is the argmax of
    the reference logits within the grammar's mask at that point, and each forced token is what llguidance
    forced there. Fewer steps than tokens: the runs went in whole."""
    constraint = engine.grammars.compile(json_schema_grammar(SCHEMA), "response_format")
    checked = 0
    for prompt in PROMPTS:
        ids = prompt_ids(engine, prompt)
        row, text, steps = run_alone(engine, ids, constraint)
        json.loads(text)
        outputs, forced = row.output_ids, forced_log.get(id(row.grammar), [])
        assert forced and steps < len(outputs) - len(forced) + 2, (steps, len(outputs), len(forced))
        with torch.inference_mode():
            logits = engine.model(torch.tensor([ids + outputs]))[0].float()
        replay = constraint.row(forcing=False)
        pending: list[int] = []
        for i, token in enumerate(outputs):
            if not pending:
                pending = replay.matcher.compute_ff_tokens()
            if pending:  # the grammar forced this token
                assert token == pending.pop(0), (prompt, i)
            else:
                reference = logits[len(ids) + i - 1]
                allowed = reference.masked_fill(replay.allowed().banned(), float("-inf"))
                top2 = allowed.topk(2).values
                if top2[0] - top2[1] > 1e-3:  # not a near tie that rounding could flip
                    assert token == int(allowed.argmax()), (prompt, i)
                    checked += 1
            replay.accept(token)
        assert replay.complete()
    assert checked >= 10


def test_in_a_batch_forced_tokens_go_one_per_step_with_the_same_tokens(engine, forced_log):
    """The same greedy JSON requests together in one batch (forced tokens one per step, no mask) and alone
    (forced runs fed whole): the same tokens."""
    constraint = engine.grammars.compile(json_schema_grammar(SCHEMA), "response_format")
    alone = [run_alone(engine, prompt_ids(engine, p), constraint)[0].output_ids for p in PROMPTS]
    masks = []
    original = RowGrammar.allowed
    RowGrammar.allowed = lambda self: masks.append(1) or original(self)
    try:
        outs = [submit(engine, prompt_ids(engine, p), constraint) for p in PROMPTS]
        engine.step()
        rows = list(engine.rows)
        assert len(rows) == len(PROMPTS)
        while not all(o["done"] for o in outs):
            engine.step()
    finally:
        RowGrammar.allowed = original
    by_prompt = {tuple(row.request.prompt_ids): row.output_ids for row in rows}
    assert [by_prompt[tuple(prompt_ids(engine, p))] for p in PROMPTS] == alone
    forced = sum(len(forced_log.get(id(row.grammar), [])) for row in rows)
    chosen = sum(len(row.output_ids) for row in rows) - forced
    assert forced > 0 and len(masks) <= chosen  # no forced token needed a mask


def test_a_newcomer_waits_one_step_while_a_forced_run_is_fed(engine):
    """A request that arrives while the row alone holds a forced run that is not fed in yet: the run goes in
    first (alone, no padding for the newcomer), the newcomer joins at the next step, and both rows give
    what they give alone."""
    constraint = engine.grammars.compile(json_schema_grammar(SCHEMA), "response_format")
    json_ids, free_ids = prompt_ids(engine, PROMPTS[0]), prompt_ids(engine, PROMPTS[1])
    json_alone = run_alone(engine, json_ids, constraint)[0].output_ids
    free_alone = run_alone(engine, free_ids, None, max_tokens=20, ignore_eos=True)[0].output_ids
    first = submit(engine, json_ids, constraint)
    engine.step()
    row = engine.rows[0]
    while row.unfed < 2:  # step until the row holds a forced run that is not fed in yet
        engine.step()
        assert not first["done"], "the JSON row ended before a forced run was left unfed"
    second = submit(engine, free_ids, None, max_tokens=20, ignore_eos=True)
    engine.step()
    assert engine.rows == [row] and row.unfed == 1 and not second["events"]  # the run went in alone
    engine.step()
    assert len(engine.rows) == 2 and second["events"]  # then the newcomer joined, with its first token
    newcomer = engine.rows[1]
    while not (first["done"] and second["done"]):
        engine.step()
    assert row.output_ids == json_alone and newcomer.output_ids == free_alone


def test_a_row_ending_inside_a_forced_run_caches_only_the_kv_it_fed(caplog):
    """The JSON closes on forced tokens that were never fed in: the prefix cache keeps the prompt and the fed
    tokens (no 'KV slots' mismatch), and the next turn reuses them."""
    from qwenlab.serve.prefix_cache import PrefixCache

    engine = make_engine(prefix_cache=PrefixCache(1 << 24))
    constraint = engine.grammars.compile(json_schema_grammar(SCHEMA), "response_format")
    ids = prompt_ids(engine, PROMPTS[2])
    with caplog.at_level(logging.WARNING, logger="qwenlab.serve"):
        row, text, _ = run_alone(engine, ids, constraint)
    assert not [r for r in caplog.records if "KV slots" in r.getMessage()]
    assert row.unfed >= 1
    fed = ids + row.output_ids[:len(row.output_ids) - row.unfed]
    cached = engine.prefix_cache.cached_length(engine.namespace(None), fed + [1, 2, 3], len(fed) + 3)
    assert cached >= len(fed) - engine.prefix_cache.block_tokens, (cached, len(fed))


def test_rows_with_logprobs_take_no_forced_tokens(engine, forced_log):
    """A row that returns logprobs reports the model's own choice at every step, so it is masked instead."""
    constraint = engine.grammars.compile(json_schema_grammar(SCHEMA), "response_format")
    out = submit(engine, prompt_ids(engine, PROMPTS[0]), constraint, logprobs=0)
    while not out["done"]:
        engine.step()
    entries = [entry for e in out["events"] for entry in (e.logprobs or [])]
    assert not forced_log and len(entries) == out["done"][0].completion_tokens
    json.loads("".join(e.text for e in out["events"]))


@pytest.mark.parametrize("max_tokens", [1, 3, 5])
def test_max_tokens_cuts_a_forced_run_where_it_falls(engine, max_tokens):
    """A budget that ends inside a forced run: exactly max_tokens tokens, finish 'length', and the text is the
    prefix of the uncut answer."""
    constraint = engine.grammars.compile(json_schema_grammar(SCHEMA), "response_format")
    ids = prompt_ids(engine, PROMPTS[1])
    _, whole, _ = run_alone(engine, ids, constraint)
    out = submit(engine, ids, constraint, max_tokens=max_tokens)
    while not out["done"]:
        engine.step()
    done = out["done"][0]
    text = "".join(e.text for e in out["events"])
    assert done.finish_reason == "length" and done.completion_tokens == max_tokens
    assert whole.startswith(text) and len(text) < len(whole)


def test_a_stop_string_inside_a_forced_run_ends_the_row_there(engine):
    """`stop` matched by forced text: the row stops at it, as with text the model chose."""
    constraint = engine.grammars.compile(json_schema_grammar(SCHEMA), "response_format")
    ids = prompt_ids(engine, PROMPTS[0])
    out = submit(engine, ids, constraint, stop=['"age"'])
    while not out["done"]:
        engine.step()
    text = "".join(e.text for e in out["events"])
    assert out["done"][0].finish_reason == "stop"
    assert text.startswith('{"name": "') and text.endswith(", ") and '"age"' not in text
