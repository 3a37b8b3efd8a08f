"""arithmetic: one integer operation, a + b, a - b or a * b.

Difficulty d (1..4) is the number of digits of each operand (d = 1 draws from 0..9).
Prompt: "What is 37 + 85?"; expected: the exact result as a plain integer, e.g. "122"
(negative for a - b when b > a, e.g. "-48"). Operators are ASCII (+, -, *) so the prompts stay
ASCII and a small BPE spends no merges on multi-byte symbols.

Scoring (see answers.py): the number after the last "answer is"/"answer:", else the last number
in the text; "1,234", "-7" and the Unicode minus are understood. Reward is 0 or 1.
"""

from __future__ import annotations

import operator

from qwenlab.tasks.answers import score_number
from qwenlab.tasks.base import TaskInstance, check_arguments
from qwenlab.tasks.rng import TaskRng

NAME = "arithmetic"
DEFAULT_DIFFICULTY = 2
MAX_DIFFICULTY = 4
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def generate(seed: int, difficulty: int) -> TaskInstance:
    check_arguments(NAME, seed, difficulty, MAX_DIFFICULTY)
    rng = TaskRng.for_instance(NAME, seed, difficulty)
    low = 0 if difficulty == 1 else 10 ** (difficulty - 1)
    high = 10 ** difficulty - 1
    symbol = rng.choice(list(OPERATORS))
    a, b = rng.integer(low, high), rng.integer(low, high)
    return TaskInstance.create(NAME, seed, difficulty, f"What is {a} {symbol} {b}?", str(OPERATORS[symbol](a, b)))


def score(completion: str, expected: str) -> float:
    """1.0 if the answer number equals `expected`, else 0.0 (rules in answers.py)."""
    return score_number(completion, expected)
