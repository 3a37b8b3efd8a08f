"""What every task shares: the TaskInstance record, the Task and TaskSource interfaces, argument checks.

A built-in task is a module with NAME, DEFAULT_DIFFICULTY, MAX_DIFFICULTY and two functions:

    generate(seed, difficulty) -> TaskInstance   fully determined by (seed, difficulty)
    score(completion, expected) -> float         a reward in [0, 1], read from free text

Difficulty runs from 1 (genuinely easy) to MAX_DIFFICULTY for every task, so one --difficulty
flag means something for all of them.

Everything the rest of qwenlab calls is a TaskSource (registry.get_task): a built-in task wrapped,
or a source spelled `KIND:ARGUMENT` (reasoning_gym:NAME, jsonl:PATH, mix:spec.yaml; see registry.py).
A source adds an identity (what peers compare before mixing rollouts) and scores against the whole
instance (`score_instance`), since some verifiers need more than the expected answer.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from qwenlab.errors import QwenlabError


@dataclass(frozen=True)
class TaskInstance:
    """One generated problem. Rebuildable from (task, seed, difficulty) alone."""

    task: str
    seed: int
    difficulty: int
    id: str
    prompt: str
    expected: str
    # The source's whole item (a reasoning-gym entry, a JSONL row), for verifiers that need more than
    # `expected`. Rebuilt with the instance, so it never travels; not compared (it is derived).
    item: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def create(cls, task: str, seed: int, difficulty: int, prompt: str, expected: str,
               item: dict[str, Any] | None = None) -> TaskInstance:
        return cls(task, seed, difficulty, instance_id(task, seed, difficulty), prompt, expected, item)


def instance_id(task: str, seed: int, difficulty: int) -> str:
    return f"{task}-{difficulty}-{seed}"


class Task(Protocol):
    """The shape of a task module (modules satisfy Protocols structurally)."""

    NAME: str
    DEFAULT_DIFFICULTY: int
    MAX_DIFFICULTY: int

    def generate(self, seed: int, difficulty: int) -> TaskInstance: ...

    def score(self, completion: str, expected: str) -> float: ...


def check_arguments(task: str, seed: int, difficulty: int, max_difficulty: int) -> None:
    """Raise QwenlabError for a seed or difficulty a task cannot use (they come from the CLI)."""
    # bool is an int subclass; True as a seed or difficulty is a caller's mistake, not 1.
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise QwenlabError(f"task '{task}': seed must be an integer, got {seed!r}")
    if not isinstance(difficulty, int) or isinstance(difficulty, bool) or not 1 <= difficulty <= max_difficulty:
        raise QwenlabError(f"task '{task}': difficulty must be an integer from 1 to {max_difficulty}, "
                           f"got {difficulty!r}")


def identity_digest(identity: dict) -> str:
    """A short stable hash of an identity dict (sorted-key JSON): what records carry and peers compare."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TaskSource:
    """A task as named on the command line: rebuilds instances from (seed, difficulty) and scores them.

    Subclasses set NAME (the spelling), `identity` (a JSON-able dict: kind, name, config, data hashes)
    and implement generate and score_instance. `size` is the number of distinct items for a finite
    source (a JSONL file; seeds index it modulo size), None for a procedural one.
    """

    NAME: str = ""
    DEFAULT_DIFFICULTY: int = 1
    MAX_DIFFICULTY: int = 1
    size: int | None = None
    identity: dict = {}

    def __init__(self) -> None:
        self.errors: Counter = Counter()  # scoring failures by exception type (reported, scored 0)

    @property
    def digest(self) -> str:
        return identity_digest(self.identity)

    def generate(self, seed: int, difficulty: int) -> TaskInstance:
        raise NotImplementedError

    def score_instance(self, completion: str, instance: TaskInstance) -> float:
        raise NotImplementedError

    def score(self, completion: str, expected: str) -> float:
        """Scoring against the expected answer alone (built-in tasks, math-verify); see score_instance."""
        raise QwenlabError(f"task '{self.NAME}' scores against its whole item; use score_instance")

    def reference_completion(self, instance: TaskInstance) -> str:
        """A completion that scores 1 (SFT data): the expected answer, in the form the verifier reads."""
        return instance.expected

    def safe_score(self, completion: str, instance: TaskInstance) -> float:
        """score_instance clamped to [0, 1]; a verifier that raises, or returns no finite number, scores 0
        and is reported on stderr (the first three times per source and kind), never ending the run."""
        try:
            value = self.score_instance(completion, instance)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"returned {value!r}, not a finite number")
        except Exception as e:  # a user's verifier may raise anything (or overrun its budget): that row scores 0
            kind = getattr(e, "kind", type(e).__name__)
            self.errors[kind] += 1
            if self.errors[kind] <= 3:
                print(f"task '{self.NAME}': WARNING: scoring {instance.id} failed ({kind}: "
                      f"{str(e).splitlines()[0][:160] if str(e) else ''}); that completion scores 0 "
                      f"({self.errors[kind]} so far)", file=sys.stderr, flush=True)
            return 0.0
        return min(1.0, max(0.0, float(value)))

    def check_difficulty(self, seed: int, difficulty: int | None) -> int:
        """Sources other than the built-in tasks have their difficulty in their config: only 1 (or None)."""
        difficulty = self.DEFAULT_DIFFICULTY if difficulty is None else difficulty
        if difficulty != 1 or isinstance(difficulty, bool):
            raise QwenlabError(f"task '{self.NAME}': its difficulty is set in its config, not by --difficulty "
                               f"(use 1 or leave it out), got {difficulty!r}")
        check_arguments(self.NAME, seed, difficulty, 1)
        return difficulty


class BuiltinTask(TaskSource):
    """A built-in task module (arithmetic, reverse, ...) seen as a TaskSource."""

    VERSION = 1  # bump when a generator or verifier changes what an instance or a reward is

    def __init__(self, module: Task):
        super().__init__()
        self.module = module
        self.NAME = module.NAME
        self.DEFAULT_DIFFICULTY, self.MAX_DIFFICULTY = module.DEFAULT_DIFFICULTY, module.MAX_DIFFICULTY
        self.identity = {"source": "builtin", "name": module.NAME, "version": self.VERSION}

    def generate(self, seed: int, difficulty: int | None) -> TaskInstance:
        return self.module.generate(seed, self.DEFAULT_DIFFICULTY if difficulty is None else difficulty)

    def score(self, completion: str, expected: str) -> float:
        return self.module.score(completion, expected)

    def score_instance(self, completion: str, instance: TaskInstance) -> float:
        return self.module.score(completion, instance.expected)
