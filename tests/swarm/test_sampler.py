"""The external pool: rebuild and re-score every foreign rollout, dedupe, rate-limit, stay bounded."""

from __future__ import annotations

from functools import cache

from qwenlab.model.tokenizer import load_tokenizer
from qwenlab.nano import nano_path
from qwenlab.swarm.sampler import ExternalPool, _BoundedSet
from qwenlab.swarm.signing import PeerIdentity
from qwenlab.tasks import generate as generate_task
from qwenlab.train.grpo.rollouts import draw_instances
from tests.swarm.test_records import SWARM, make_record


@cache
def nano_tokenizer():
    return load_tokenizer(nano_path())


def pool(own_peer_id: str = "f" * 40, **kwargs) -> ExternalPool:
    kwargs = {"tokenizer": nano_tokenizer(), "max_completion_tokens": 16, **kwargs}
    return ExternalPool(SWARM, own_peer_id, **kwargs)


def test_wrong_claimed_rewards_are_recomputed_locally():
    sender = PeerIdentity.generate()
    instance = draw_instances(["arithmetic"], 1, "claims")[0]
    wrong = str(int(instance.expected) + 1)
    # The sender says its wrong answer is right and the right one wrong.
    entry = make_record(sender, instance=instance, completions=[f"The answer is {wrong}.", instance.expected],
                        rewards=[1.0, 0.0])
    p = pool()
    report = p.ingest([entry])
    assert report.accepted == 1 and report.claim_mismatches == 1
    (rollout,) = p.take(4)
    assert rollout.rewards == [0.0, 1.0]  # ours
    assert rollout.claimed_rewards == [1.0, 0.0]  # kept for the audit only
    assert rollout.source == sender.peer_id
    # both completions fit the trained length: trained on their own tokens, text unchanged
    assert rollout.completions == [f"The answer is {wrong}.", instance.expected]
    assert rollout.completion_ids == [nano_tokenizer().encode(text) for text in rollout.completions]
    assert report.audit[0]["claim_mismatch"] is True


def test_prompt_must_be_the_rebuilt_prompt():
    sender = PeerIdentity.generate()
    instance = draw_instances(["arithmetic"], 1, "prompt")[0]
    other = generate_task("arithmetic", instance.seed + 1, instance.difficulty)
    lying = type(instance)(instance.task, instance.seed, instance.difficulty, instance.id, other.prompt,
                           other.expected)
    report = pool().ingest([make_record(sender, instance=lying)])
    assert report.rejected == {"prompt_mismatch": 1}


def test_evaluation_seeds_and_unknown_tasks_are_refused():
    sender = PeerIdentity.generate()
    eval_instance = generate_task("arithmetic", 12, 2)  # an evaluation seed: never trained on
    report = pool().ingest([make_record(sender, instance=eval_instance)])
    assert report.rejected == {"seed_out_of_range": 1}
    fake = type(eval_instance)("telepathy", 200_000_000, 1, "x", "Guess.", "0")
    assert pool().ingest([make_record(sender, instance=fake)]).rejected == {"unknown_task": 1}


def test_duplicates_are_dropped_and_own_records_skipped():
    sender = PeerIdentity.generate()
    instance = draw_instances(["reverse"], 1, "dup")[0]
    entry = make_record(sender, instance=instance)
    again_resigned = make_record(sender, instance=instance, slot=1)  # same instance, new bytes
    p = pool(sender.peer_id)
    assert p.ingest([entry]).accepted == 0  # our own record coming back
    p = pool()
    report = p.ingest([entry, entry, again_resigned])
    assert report.accepted == 1 and report.duplicates == 2
    assert p.ingest([entry]).duplicates == 1  # and in later fetches


def test_rate_limit_per_sender():
    flooder, honest = PeerIdentity.generate(), PeerIdentity.generate()
    instances = draw_instances(["arithmetic"], 12, "flood")
    p = pool(rate_burst=5, rate_per_s=0.0)
    flood = [make_record(flooder, slot=i, instance=inst) for i, inst in enumerate(instances[:10])]
    report = p.ingest(flood + [make_record(honest, instance=instances[11])])
    assert report.accepted == 6 and report.rejected == {"rate_limited": 5}


def test_take_returns_each_rollout_once_and_the_pool_is_bounded():
    senders = [PeerIdentity.generate() for _ in range(3)]
    instances = draw_instances(["arithmetic"], 30, "bounded")
    p = pool(max_pool=8)
    p.ingest([make_record(senders[i % 3], slot=i, instance=inst) for i, inst in enumerate(instances)])
    assert len(p) == 8
    first, second = p.take(5), p.take(5)
    assert len(first) == 5 and len(second) == 3 and len(p) == 0
    assert len({(r.source, r.seed) for r in first + second}) == 8


def test_seen_table_is_bounded():
    seen = _BoundedSet(100)
    for i in range(1000):
        seen.add(i)
    assert len(seen) == 100 and seen.add(999) is False and seen.add(0) is True
