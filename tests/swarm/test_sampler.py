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
    assert pool().ingest([make_record(sender, instance=fake, task_identity="0" * 24)]).rejected == {"unknown_task": 1}


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


def _chain_sum_config(folder, max_digits: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "chain_sum.yaml").write_text(f"min_terms: 2\nmax_terms: 2\nmax_digits: {max_digits}\n")
    return f"reasoning_gym:chain_sum@{folder / 'chain_sum.yaml'}"


def test_records_are_mapped_by_task_identity_and_another_identity_is_refused(tmp_path):
    """Two peers name the same config file by different paths: its identity matches, so the record is
    rebuilt with the receiver's own spelling. Another config under the same name is refused."""
    sender = PeerIdentity.generate()
    theirs = _chain_sum_config(tmp_path / "sender", max_digits=1)
    ours_same = _chain_sum_config(tmp_path / "receiver", max_digits=1)
    ours_other = _chain_sum_config(tmp_path / "other", max_digits=3)
    instance = draw_instances([theirs], 1, "identity")[0]
    completions = [f"<answer>{instance.expected}</answer>", "<answer>-1</answer>"]
    entry = make_record(sender, instance=instance, completions=completions)

    same = pool(tasks=[ours_same])
    assert same.ingest([entry]).accepted == 1
    (rollout,) = same.take(1)
    assert rollout.task == ours_same and rollout.rewards == [1.0, 0.0]

    other = pool(tasks=[ours_other, "arithmetic"])
    report = other.ingest([entry])
    assert report.rejected == {"task_identity": 1} and len(other) == 0


def test_records_from_another_tokenizer_family_are_refused():
    sender = PeerIdentity.generate()
    entry = make_record(sender, tokenizer="a" * 24)
    assert pool().ingest([entry]).rejected == {"tokenizer": 1}


def test_zero_advantage_groups_are_dropped_before_the_uniform_draw():
    senders = [PeerIdentity.generate() for _ in range(2)]
    instances = draw_instances(["arithmetic"], 6, "advantage")
    entries = [make_record(senders[i % 2], slot=i, instance=inst,
                           completions=[inst.expected, "no idea"] if i < 2 else ["no idea", "still no idea"])
               for i, inst in enumerate(instances)]  # two groups with a right and a wrong answer, four all wrong
    sapo = pool()
    assert sapo.ingest(entries).accepted == 6
    taken = sapo.take(4)
    assert len(taken) == 2 and all(r.rewards == [1.0, 0.0] for r in taken)
    assert sapo.dropped_zero_advantage == 4 and len(sapo) == 0
    uniform = pool()
    uniform.ingest(entries)
    taken = uniform.take(6, "uniform")
    assert len(taken) == 6 and sum(r.rewards == [0.0, 0.0] for r in taken) == 4
