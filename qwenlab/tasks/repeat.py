"""repeat: write a word back exactly as given (a copy).

The word is a random string of letters a-z. nano is not trained on this task (qwenlab.nano.train
lists the tasks it learns), so it is the skill an adapter adds from nothing: the built-in recipe's
second specialist. Its prompt uses only characters nano's tokenizer was trained on.
Difficulty d (1..4) sets the length: d + 2 to d + 3 letters (3-4 at d = 1, 6-7 at d = 4).
Prompt: "Repeat the word 'qzk'."; expected: "qzk".

Scoring (see answers.py): the first word after the last "answer is"/"answer:", else the last word
in the text; quotes and punctuation are ignored, case is ignored. Reward is 0 or 1.
"""

from __future__ import annotations

from qwenlab.tasks.answers import score_word
from qwenlab.tasks.base import TaskInstance, check_arguments
from qwenlab.tasks.rng import TaskRng

NAME = "repeat"
DEFAULT_DIFFICULTY = 2
MAX_DIFFICULTY = 4


def generate(seed: int, difficulty: int) -> TaskInstance:
    check_arguments(NAME, seed, difficulty, MAX_DIFFICULTY)
    rng = TaskRng.for_instance(NAME, seed, difficulty)
    word = rng.letters(rng.integer(difficulty + 2, difficulty + 3))
    return TaskInstance.create(NAME, seed, difficulty, f"Repeat the word '{word}'.", word)


def score(completion: str, expected: str) -> float:
    """1.0 if the answer word equals `expected` ignoring case, else 0.0 (rules in answers.py)."""
    return score_word(completion, expected)
