"""The SAPO mix: I local + J external rollouts per step, from a bounded pool of verified records.

Every DHT entry a fetch returns goes through `ExternalPool.ingest`:
  1. duplicate?   the same bytes, or the same (sender, task, seed, difficulty), seen before: dropped
  2. decode_record (records.py): size cap, schema, fields, peer id, signature, age
  3. rate limit   a token bucket per sender (burst, then records per second)
  4. the task     rebuilt from (task, seed, difficulty) with our own generator; the seed must be a
                  training seed (never an evaluation one) and the prompt must be the rebuilt prompt
  5. re-score     every completion with our own verifier; the sender's rewards are only compared,
                  to count how often a sender's claim was wrong
Accepted records wait in the pool (oldest dropped beyond `max_pool`) until `take` hands them to
training, each at most once. All tables are bounded, so a long run's memory stays flat.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from qwenlab.errors import QwenlabError
from qwenlab.swarm.records import RecordLimits, RecordRejected, RolloutRecord, decode_record
from qwenlab.tasks import generate as generate_task
from qwenlab.tasks import get_task
from qwenlab.train.grpo.rollouts import TRAIN_SEED_HIGH, TRAIN_SEED_LOW, Rollout


@dataclass
class IngestReport:
    accepted: int = 0
    duplicates: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    claim_mismatches: int = 0  # accepted records whose claimed rewards differ from ours
    audit: list[dict] = field(default_factory=list)  # one entry per new record, for the audit log

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


class TokenBucket:
    def __init__(self, burst: float, per_second: float, now: float):
        self.capacity, self.rate, self.tokens, self.updated = burst, per_second, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class _BoundedSet:
    """Remembers the last `size` keys (a long-lived peer must not grow without bound)."""

    def __init__(self, size: int):
        self.size, self._keys = size, OrderedDict()

    def add(self, key) -> bool:
        """True if new."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self.size:
            self._keys.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._keys)


def rebuild_and_score(record: RolloutRecord) -> list[float]:
    """Our rewards for a record's completions; RecordRejected if the instance does not check out."""
    try:
        task = get_task(record.task)
    except QwenlabError:
        raise RecordRejected("unknown_task", record.task[:40]) from None
    if not TRAIN_SEED_LOW <= record.seed <= TRAIN_SEED_HIGH:
        raise RecordRejected("seed_out_of_range", f"seed {record.seed} is not a training seed")
    try:
        instance = generate_task(record.task, record.seed, record.difficulty)
    except QwenlabError as e:
        raise RecordRejected("invalid", str(e)) from None
    if instance.prompt != record.prompt:
        raise RecordRejected("prompt_mismatch", f"{record.task} seed {record.seed}")
    return [float(task.score(text, instance.expected)) for text in record.completions]


class ExternalPool:
    def __init__(self, swarm: str, own_peer_id: str, limits: RecordLimits = RecordLimits(), *,
                 rate_burst: float = 64, rate_per_s: float = 8.0, max_pool: int = 256,
                 max_seen: int = 65536, max_senders: int = 1024, seed: int = 0):
        self.swarm, self.own_peer_id, self.limits = swarm, own_peer_id, limits
        self.rate_burst, self.rate_per_s = rate_burst, rate_per_s
        self.max_pool, self.max_senders = max_pool, max_senders
        self._seen = _BoundedSet(max_seen)
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._pool: OrderedDict[tuple, Rollout] = OrderedDict()
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self._pool)

    def _allow(self, peer_id: str, now: float) -> bool:
        bucket = self._buckets.get(peer_id)
        if bucket is None:
            bucket = self._buckets[peer_id] = TokenBucket(self.rate_burst, self.rate_per_s, now)
            if len(self._buckets) > self.max_senders:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(peer_id)
        return bucket.take(now)

    def ingest(self, entries: list[tuple[object, object]], now: float | None = None) -> IngestReport:
        """Check (subkey, value) pairs from the DHT; keep the good ones, count the rest."""
        now = time.time() if now is None else now
        report = IngestReport()
        for subkey, value in entries:
            if isinstance(subkey, str) and subkey.startswith(self.own_peer_id + ":"):
                continue  # our own records come back from the DHT too
            digest = hashlib.sha256(value if isinstance(value, bytes) else repr(value).encode()[:4096]).digest()
            if not self._seen.add(digest):
                report.duplicates += 1
                continue
            try:
                record = decode_record(value, subkey, swarm=self.swarm, limits=self.limits, now=now)
                if record.peer_id == self.own_peer_id:
                    raise RecordRejected("peer_id", "a record signed with our own key that we did not publish")
                if not self._seen.add(("instance", record.peer_id, record.task, record.seed, record.difficulty)):
                    report.duplicates += 1
                    continue
                if not self._allow(record.peer_id, now):
                    raise RecordRejected("rate_limited", record.peer_id)
                rewards = rebuild_and_score(record)
            except RecordRejected as rejected:
                report.rejected[rejected.reason] += 1
                report.audit.append({"accepted": False, "reason": rejected.reason, "detail": str(rejected)[:200],
                                     "subkey": str(subkey)[:80]})
                continue
            mismatch = [round(r, 4) for r in record.rewards] != [round(r, 4) for r in rewards]
            report.accepted += 1
            report.claim_mismatches += mismatch
            report.audit.append({"accepted": True, "peer": record.peer_id, "round": record.round,
                                 "task": record.task, "seed": record.seed, "difficulty": record.difficulty,
                                 "claimed_rewards": list(record.rewards), "rewards": rewards,
                                 "claim_mismatch": mismatch})
            self._add(record, rewards)
        return report

    def _add(self, record: RolloutRecord, rewards: list[float]) -> None:
        rollout = Rollout(task=record.task, seed=record.seed, difficulty=record.difficulty, prompt=record.prompt,
                          completions=list(record.completions), rewards=rewards,
                          finish_reasons=list(record.finish_reasons), completion_ids=None, source=record.peer_id,
                          claimed_rewards=list(record.rewards))
        self._pool[(record.peer_id, record.round, record.slot)] = rollout
        while len(self._pool) > self.max_pool:
            self._pool.popitem(last=False)  # the oldest records are the most off-policy: drop them first

    def take(self, n: int) -> list[Rollout]:
        """Up to n external rollouts, drawn uniformly from the pool and removed from it."""
        keys = list(self._pool)
        chosen = self._rng.sample(keys, min(n, len(keys)))
        return [self._pool.pop(k) for k in chosen]
