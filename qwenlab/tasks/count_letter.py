"""count_letter: count how often a letter occurs in a word.

The word is a random string of letters a-z. The count is drawn first, uniformly from 0 to d + 1,
and the letter is placed that many times at random positions among other letters -- drawing the
word first would make 0 and 1 almost every answer.
Difficulty d (1..4) sets the length, d + 3 to d + 4 letters (4-5 at d = 1, 7-8 at d = 4), and the
largest count, d + 1.
Prompt: "How many times does the letter 'a' appear in 'banana'?"; expected: "3".

Scoring (see answers.py): the number after the last "answer is"/"answer:", else the last number
in the text, so "The letter 'a' appears 3 times." reads 3. Digits only ("three" scores 0).
Reward is 0 or 1.
"""

from __future__ import annotations

from string import ascii_lowercase

from qwenlab.tasks.answers import score_number
from qwenlab.tasks.base import TaskInstance, check_arguments
from qwenlab.tasks.rng import TaskRng

NAME = "count_letter"
DEFAULT_DIFFICULTY = 2
MAX_DIFFICULTY = 4


def generate(seed: int, difficulty: int) -> TaskInstance:
    check_arguments(NAME, seed, difficulty, MAX_DIFFICULTY)
    rng = TaskRng.for_instance(NAME, seed, difficulty)
    length = rng.integer(difficulty + 3, difficulty + 4)
    count = rng.integer(0, difficulty + 1)
    letter = rng.choice(ascii_lowercase)
    others = ascii_lowercase.replace(letter, "")
    chars = [letter] * count + [rng.choice(others) for _ in range(length - count)]
    rng.shuffle(chars)
    word = "".join(chars)
    prompt = f"How many times does the letter '{letter}' appear in '{word}'?"
    return TaskInstance.create(NAME, seed, difficulty, prompt, str(count))


def score(completion: str, expected: str) -> float:
    """1.0 if the answer number equals `expected`, else 0.0 (rules in answers.py)."""
    return score_number(completion, expected)
