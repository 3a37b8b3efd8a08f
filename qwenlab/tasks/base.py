"""What every task shares: the TaskInstance record, the Task interface, and argument checks.

A task is a module with NAME, DEFAULT_DIFFICULTY, MAX_DIFFICULTY and two functions:

    generate(seed, difficulty) -> TaskInstance   fully determined by (seed, difficulty)
    score(completion, expected) -> float         a reward in [0, 1], read from free text

Difficulty runs from 1 (genuinely easy) to MAX_DIFFICULTY for every task, so one --difficulty
flag means something for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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

    @classmethod
    def create(cls, task: str, seed: int, difficulty: int, prompt: str, expected: str) -> TaskInstance:
        return cls(task, seed, difficulty, instance_id(task, seed, difficulty), prompt, expected)


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
