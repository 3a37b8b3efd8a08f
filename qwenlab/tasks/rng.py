"""Seeded draws that stay the same on every machine and every Python version.

Peers in a swarm rebuild each other's task instances from (task, seed, difficulty), so the draws
must not depend on the process, the platform or the interpreter. Python promises only two things
about `random` across versions: seeding from a str keeps working the same way (it is hashed with
SHA-512, not with the salted hash()), and `Random.random()` keeps producing the same sequence.
randint/choice/shuffle carry no such promise, so every draw here is built on random() alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from string import ascii_lowercase
from typing import TypeVar

T = TypeVar("T")


class TaskRng:
    """Deterministic draws for one key, e.g. TaskRng.for_instance("reverse", 7, 2)."""

    def __init__(self, key: str):
        self._random = random.Random(key)

    @classmethod
    def for_instance(cls, task: str, seed: int, difficulty: int) -> TaskRng:
        return cls(f"{task}:{seed}:{difficulty}")

    def integer(self, low: int, high: int) -> int:
        """A uniform integer in [low, high], both ends included."""
        span = high - low + 1
        # min() guards the float edge case where random() * span could round up to span.
        return low + min(int(self._random.random() * span), span - 1)

    def fraction(self) -> float:
        """A uniform float in [0, 1)."""
        return self._random.random()

    def choice(self, items: Sequence[T]) -> T:
        return items[self.integer(0, len(items) - 1)]

    def shuffle(self, items: list[T]) -> None:
        """Fisher-Yates shuffle in place."""
        for i in range(len(items) - 1, 0, -1):
            j = self.integer(0, i)
            items[i], items[j] = items[j], items[i]

    def letters(self, length: int, alphabet: str = ascii_lowercase) -> str:
        """A random string of `length` letters drawn (with repeats) from `alphabet`."""
        return "".join(self.choice(alphabet) for _ in range(length))
