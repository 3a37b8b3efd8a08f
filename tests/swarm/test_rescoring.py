"""What is scored is what is trained: a foreign completion is re-scored on exactly the tokens the
receiving peer trains on, before any parsing the size cap holds, and re-scoring stays within a budget."""

from __future__ import annotations

import time

import msgpack
import pytest

from qwenlab.errors import QwenlabError
from qwenlab.swarm import records
from qwenlab.swarm.records import RecordLimits, RecordRejected, decode_record
from qwenlab.swarm.sampler import ExternalPool
from qwenlab.swarm.signing import PeerIdentity
from qwenlab.tasks import get_task
from qwenlab.train.grpo import GRPOConfig, GRPOLearner, Rollout
from qwenlab.train.grpo.rollouts import draw_instances
from qwenlab.swarm.records import tokenizer_digest
from tests.swarm.test_records import SWARM, make_record

MAX_TOKENS = 8
GARBAGE = "zq#@!zq#@!"  # bytes the tiny tokenizer never merged: one token each, more than MAX_TOKENS


@pytest.fixture(scope="module")
def learner(tiny_model_dir):
    return GRPOLearner.create(GRPOConfig(model=str(tiny_model_dir), max_new_tokens=MAX_TOKENS, num_generations=2))


def receive(learner: GRPOLearner, completions: list[str], key: str, **limits) -> tuple[Rollout, object]:
    """One record from another peer through the receiving peer's pool: (the rollout it trains on, the report)."""
    instance = draw_instances(["arithmetic"], 1, key)[0]
    pool = ExternalPool(SWARM, "f" * 40, RecordLimits(**limits), tokenizer=learner.tokenizer,
                        max_completion_tokens=learner.config.max_new_tokens)
    report = pool.ingest([make_record(PeerIdentity.generate(), instance=instance, tokenizer=pool.tokenizer_digest,
                                      completions=[c.format(answer=instance.expected,
                                                            wrong=int(instance.expected) + 1) for c in completions],
                                      rewards=[1.0] * len(completions))])
    taken = pool.take(1, "uniform")  # every group, even one that scored all 0: the test reads its rewards
    return (taken[0] if taken else None), report


def assert_scored_is_trained(learner: GRPOLearner, rollout: Rollout) -> None:
    """Each reward is our verifier's on the decoded text of exactly the ids the learner trains on."""
    expected = get_task("arithmetic").generate(rollout.seed, rollout.difficulty).expected
    for i, text in enumerate(rollout.completions):
        ids = rollout.completion_ids[i]
        assert len(ids) <= MAX_TOKENS
        assert learner.tokenizer.decode(ids, skip_special_tokens=False) == text
        trained = learner._completion_ids(rollout, i)
        assert trained == ids + ([learner.end_id] if rollout.finish_reasons[i] == "stop" else [])
        if "<|" not in text:
            assert rollout.rewards[i] == get_task("arithmetic").score(text, expected)


def test_poison_prefix_earns_nothing(learner):
    """Garbage in the trained tokens, the right answer only beyond them: reward 0, trained as cut."""
    poison = GARBAGE + " The answer is {answer}."
    rollout, report = receive(learner, [poison, "The answer is {answer}."], "poison-prefix")
    assert report.accepted == 1
    instance = get_task("arithmetic").generate(rollout.seed, rollout.difficulty)
    # what the sender published, scored whole, earns 1: the attack works on full-text scoring
    assert get_task("arithmetic").score(poison.format(answer=instance.expected), instance.expected) == 1.0
    assert rollout.rewards == [0.0, 1.0]  # the poison scored on what is trained: garbage only
    assert len(rollout.completion_ids[0]) == MAX_TOKENS and rollout.finish_reasons[0] == "length"
    assert instance.expected not in rollout.completions[0]
    assert rollout.finish_reasons[1] == "stop"  # it fit: trained whole, with its end token
    assert report.claim_mismatches == 1
    assert_scored_is_trained(learner, rollout)
    stats = learner.train_step([rollout])
    assert stats["tokens"] == MAX_TOKENS + len(rollout.completion_ids[1]) + 1


def test_right_prefix_with_a_wrong_tail_is_scored_on_the_prefix_it_trains_on(learner):
    """The reverse: the trained tokens answer right, a wrong "answer is" follows past the cut. Scored
    whole it reads the wrong answer; trained on the prefix, it is scored on the prefix."""
    text = "The answer is {answer}. " + GARBAGE + " The answer is {wrong}."
    rollout, _ = receive(learner, [text, "no"], "right-prefix")
    instance = get_task("arithmetic").generate(rollout.seed, rollout.difficulty)
    whole = text.format(answer=instance.expected, wrong=int(instance.expected) + 1)
    assert get_task("arithmetic").score(whole, instance.expected) == 0.0
    assert rollout.rewards == [1.0, 0.0] and rollout.finish_reasons[0] == "length"
    assert whole.startswith(rollout.completions[0]) and rollout.completions[0] != whole
    assert_scored_is_trained(learner, rollout)


def test_a_completion_holding_a_special_token_scores_zero(learner):
    """'<|im_end|>' typed into the text becomes the end token when re-tokenised; training on it mid-
    completion is not what any peer sampled, so it earns nothing even with the right answer after it."""
    rollout, _ = receive(learner, ["<|im_end|>{answer}", "{answer}"], "special")
    assert learner.end_id in rollout.completion_ids[0]
    assert rollout.rewards == [0.0, 1.0]
    assert_scored_is_trained(learner, rollout)


def test_the_learner_refuses_text_longer_than_it_would_train_on(learner):
    """Defense in depth: a text-only rollout whose reward covers tokens past max_new_tokens is refused."""
    long = Rollout("arithmetic", 100_000_009, 1, "What is 1 + 1?", [GARBAGE + " 2", "2"], [1.0, 0.0],
                   ["stop", "stop"], source="someone")
    with pytest.raises(QwenlabError, match="more than max_new_tokens 8"):
        learner.train_step([long])


def test_size_cap_is_checked_before_any_parsing(monkeypatch, learner):
    calls = []
    unpackb = msgpack.unpackb
    monkeypatch.setattr(records.msgpack, "unpackb", lambda *a, **k: calls.append(1) or unpackb(*a, **k))
    identity = PeerIdentity.generate()
    subkey, big = make_record(identity, completions=["7" * 8000] * 9)  # valid and signed, 72 KB
    limits = RecordLimits()
    assert len(big) > limits.max_record_bytes
    with pytest.raises(RecordRejected, match="oversized"):
        decode_record(big, subkey, swarm=SWARM, limits=limits)
    assert calls == []  # not a byte of it was parsed
    decode_record(big, subkey, swarm=SWARM, limits=RecordLimits(max_record_bytes=len(big)))
    assert calls  # the same bytes under a larger cap are parsed (and pass): the cap alone refused them
    # the pool checks it first too: not remembered as seen (no hash), rejected again as oversized
    pool = ExternalPool(SWARM, "f" * 40, tokenizer=learner.tokenizer, max_completion_tokens=MAX_TOKENS)
    assert pool.ingest([(subkey, big)]).rejected == {"oversized": 1}
    assert pool.ingest([(subkey, big)]).rejected == {"oversized": 1}


def test_rescoring_a_64_kib_record_is_bounded(learner):
    """Completions made to be slow to score (thousands of "answer is" markers, no number after them):
    the whole ingest of a record just under the 64 KiB cap takes a bounded CPU time (it took 1.86 s
    in answers.py alone before the verifier became linear). A generous regression bound, not a benchmark."""
    slow = ["answer is " * 760] * 8
    identity = PeerIdentity.generate()
    instance = draw_instances(["arithmetic"], 1, "slow")[0]
    subkey, value = make_record(identity, instance=instance, completions=slow,
                                tokenizer=tokenizer_digest(learner.tokenizer))
    assert 60_000 < len(value) <= RecordLimits().max_record_bytes
    pool = ExternalPool(SWARM, "f" * 40, tokenizer=learner.tokenizer, max_completion_tokens=MAX_TOKENS)
    started = time.process_time()
    report = pool.ingest([(subkey, value)])
    assert time.process_time() - started < 0.2
    assert report.accepted == 1
    # and a record over its per-record CPU budget is rejected, not scored on
    subkey, value = make_record(identity, instance=draw_instances(["arithmetic"], 1, "slow2")[0], completions=slow,
                                tokenizer=tokenizer_digest(learner.tokenizer))
    pool = ExternalPool(SWARM, "f" * 40, RecordLimits(max_score_s=0.0), tokenizer=learner.tokenizer,
                        max_completion_tokens=MAX_TOKENS)
    report = pool.ingest([(subkey, value)])
    assert report.rejected == {"over_budget": 1} and len(pool) == 0
