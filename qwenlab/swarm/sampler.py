"""The SAPO mix: I local + J external rollouts per step, from a bounded pool of verified records.

Every DHT entry a fetch returns goes through `ExternalPool.ingest`:
  1. not bytes, or over the size cap: rejected before anything reads it (not even a hash)
  2. duplicate?   the same bytes, or the same (sender, task, seed, difficulty), seen before: dropped
  3. decode_record (records.py): schema, fields, peer id, signature, age
  4. rate limit   a token bucket per sender (burst, then records per second)
  5. the task     the record's tokenizer digest must be ours (one tokenizer family per swarm), and its
                  task identity (name, config, data hashes) one of our task sources': then the instance
                  is rebuilt from (our source, seed, difficulty) with our own generator; the seed must
                  be a training seed (never an evaluation one) and the prompt must be the rebuilt prompt
  6. re-score     what is scored is what is trained: each completion is re-tokenised with our
                  tokenizer, cut to our max_new_tokens, and the text of exactly those ids is scored
                  by our own verifier (a completion holding a special token scores 0). The pool
                  keeps those ids, so training uses the same tokens. The sender's rewards are only
                  compared, to count how often a sender's claim was wrong. Re-scoring a record has a
                  CPU-time budget (RecordLimits.max_score_s): a record that exceeds it is rejected.
Accepted records wait in the pool (oldest dropped beyond `max_pool`) until `take` hands them to
training, each at most once: SAPO's rule drops the groups whose completions all scored the same
(zero advantage: no gradient) and samples uniformly from the rest; "uniform" samples from all. All tables are bounded, so a long run's memory stays flat.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from qwenlab.errors import QwenlabError
from qwenlab.swarm.records import RecordLimits, RecordRejected, RolloutRecord, check_raw_size, decode_record
from qwenlab.swarm.records import tokenizer_digest
from qwenlab.tasks import get_task
from qwenlab.train.grpo.rollouts import TRAIN_SEED_HIGH, TRAIN_SEED_LOW, Rollout, trained_completion


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


@dataclass
class Rescored:
    """A record's completions as this peer trains on them, and its own rewards for exactly those."""

    completions: list[str]  # the decoded text of `completion_ids`
    completion_ids: list[list[int]]
    finish_reasons: list[str]  # "length" where the completion was cut to the trained length
    rewards: list[float]
    task: str  # our spelling of the record's task source


SELECTION_RULES = ("drop_zero_advantage", "uniform")


def rebuild_and_score(record: RolloutRecord, tokenizer, max_completion_tokens: int,
                      limits: RecordLimits = RecordLimits(), tasks: dict[str, str] | None = None) -> Rescored:
    """Our rewards for a record's completions, on the tokens we will train on; RecordRejected if the
    instance does not check out or scoring runs over its CPU-time budget.

    tasks: our task sources by identity digest (spelling per digest); None accepts any source this
    process can open under the record's own spelling whose identity matches.
    """
    if tasks is None:
        try:
            source = get_task(record.task)
        except QwenlabError:
            raise RecordRejected("unknown_task", record.task[:40]) from None
        spelling = record.task
        if source.digest != record.task_identity:
            raise RecordRejected("task_identity", f"{record.task[:60]}: identity {record.task_identity[:24]} "
                                                  f"is not ours ({source.digest})")
    else:
        spelling = tasks.get(record.task_identity)
        if spelling is None:
            raise RecordRejected("task_identity", f"{record.task[:60]}: no task of ours has identity "
                                                  f"{record.task_identity[:24]}")
        source = get_task(spelling)
    if not TRAIN_SEED_LOW <= record.seed <= TRAIN_SEED_HIGH:
        raise RecordRejected("seed_out_of_range", f"seed {record.seed} is not a training seed")
    try:
        instance = source.generate(record.seed, record.difficulty)
    except QwenlabError as e:
        raise RecordRejected("invalid", str(e)) from None
    if instance.prompt != record.prompt:
        raise RecordRejected("prompt_mismatch", f"{record.task} seed {record.seed}")
    # CPU time of this thread: other processes on the machine do not count against a record.
    deadline = time.thread_time() + limits.max_score_s
    out = Rescored([], [], [], [], spelling)
    for text, reason in zip(record.completions, record.finish_reasons):
        trained = trained_completion(tokenizer, text, max_completion_tokens)
        reward = 0.0 if trained.control else source.safe_score(trained.text, instance)
        out.completions.append(trained.text)
        out.completion_ids.append(trained.ids)
        out.finish_reasons.append("length" if trained.cut else reason)
        out.rewards.append(reward)
        if time.thread_time() > deadline:
            raise RecordRejected("over_budget", f"re-scoring took over {limits.max_score_s} s of CPU")
    return out


class ExternalPool:
    """Verified, re-scored foreign rollouts waiting to be trained on.

    tokenizer and max_completion_tokens are the learner's: a foreign completion is scored on exactly
    the tokens the learner will train on (see rebuild_and_score).
    """

    def __init__(self, swarm: str, own_peer_id: str, limits: RecordLimits = RecordLimits(), *,
                 tokenizer, max_completion_tokens: int, tasks: list[str] | None = None,
                 rate_burst: float = 64, rate_per_s: float = 8.0, max_pool: int = 256,
                 max_seen: int = 65536, max_senders: int = 1024, seed: int = 0):
        if max_completion_tokens < 1:
            raise QwenlabError(f"swarm: max_completion_tokens must be >= 1, got {max_completion_tokens}")
        # our task sources by identity digest: a record is rebuilt with OUR source of the same identity
        self.tasks = None if tasks is None else {get_task(t).digest: t for t in tasks}
        self.tokenizer_digest = tokenizer_digest(tokenizer)
        self.dropped_zero_advantage = 0  # records take() left out as carrying no gradient
        self.swarm, self.own_peer_id, self.limits = swarm, own_peer_id, limits
        self.tokenizer, self.max_completion_tokens = tokenizer, max_completion_tokens
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
            try:
                check_raw_size(value, self.limits)  # before anything reads the value, even a hash
            except RecordRejected as rejected:
                self._reject(report, rejected, subkey)
                continue
            if not self._seen.add(hashlib.sha256(value).digest()):
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
                if record.tokenizer != self.tokenizer_digest:
                    raise RecordRejected("tokenizer", f"{record.peer_id}: tokenizer {record.tokenizer[:24]} is not "
                                                      f"ours ({self.tokenizer_digest}): another tokenizer family")
                rescored = rebuild_and_score(record, self.tokenizer, self.max_completion_tokens, self.limits,
                                             self.tasks)
            except RecordRejected as rejected:
                self._reject(report, rejected, subkey)
                continue
            rewards = rescored.rewards
            mismatch = [round(r, 4) for r in record.rewards] != [round(r, 4) for r in rewards]
            report.accepted += 1
            report.claim_mismatches += mismatch
            report.audit.append({"accepted": True, "peer": record.peer_id, "round": record.round,
                                 "task": record.task, "seed": record.seed, "difficulty": record.difficulty,
                                 "claimed_rewards": list(record.rewards), "rewards": rewards,
                                 "claim_mismatch": mismatch})
            self._add(record, rescored)
        return report

    @staticmethod
    def _reject(report: IngestReport, rejected: RecordRejected, subkey) -> None:
        report.rejected[rejected.reason] += 1
        report.audit.append({"accepted": False, "reason": rejected.reason, "detail": str(rejected)[:200],
                             "subkey": str(subkey)[:80]})

    def _add(self, record: RolloutRecord, rescored: Rescored) -> None:
        # The text, ids and finish reasons that were scored: training uses exactly these.
        rollout = Rollout(task=rescored.task, seed=record.seed, difficulty=record.difficulty, prompt=record.prompt,
                          completions=rescored.completions, rewards=rescored.rewards,
                          finish_reasons=rescored.finish_reasons, completion_ids=rescored.completion_ids,
                          source=record.peer_id, claimed_rewards=list(record.rewards))
        self._pool[(record.peer_id, record.round, record.slot)] = rollout
        while len(self._pool) > self.max_pool:
            self._pool.popitem(last=False)  # the oldest records are the most off-policy: drop them first

    def take(self, n: int, rule: str = "drop_zero_advantage") -> list[Rollout]:
        """Up to n external rollouts, removed from the pool. SAPO's rule ("drop_zero_advantage"): groups
        whose completions all scored the same are dropped from the pool first (their advantage is 0,
        so they add no gradient), then n are drawn uniformly from the rest; "uniform" draws from all."""
        if rule not in SELECTION_RULES:
            raise QwenlabError(f"swarm: external selection must be one of {', '.join(SELECTION_RULES)}, got {rule!r}")
        if rule == "drop_zero_advantage":
            flat = [k for k, r in self._pool.items() if len(set(r.rewards)) < 2]
            for key in flat:
                del self._pool[key]
            self.dropped_zero_advantage += len(flat)
        keys = list(self._pool)
        chosen = self._rng.sample(keys, min(n, len(keys)))
        return [self._pool.pop(k) for k in chosen]
