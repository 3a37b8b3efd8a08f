"""The word tasks: a random word in, a transformed word out (reverse, sort_letters, repeat).

The word is a random string of letters a-z (not a dictionary word: a BPE tokenizer would swallow
common words whole, and a random string cannot be answered from memory). Difficulty d (1..4) sets
the length: d + 2 to d + 3 letters (3-4 at d = 1, 6-7 at d = 4).

Scoring (see answers.py): the first word after the last "answer is"/"answer:", else the last word
in the text; quotes and punctuation are ignored, case is ignored. Reward is 0 or 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from qwenlab.tasks.answers import score_word
from qwenlab.tasks.base import TaskInstance, check_arguments
from qwenlab.tasks.rng import TaskRng


@dataclass(frozen=True)
class WordTask:
    """A task module's shape (base.Task) as one value: NAME, difficulties, generate and score."""

    NAME: str
    prompt: str  # with {word}
    transform: Callable[[str], str]
    DEFAULT_DIFFICULTY: int = 2
    MAX_DIFFICULTY: int = 4

    def generate(self, seed: int, difficulty: int) -> TaskInstance:
        check_arguments(self.NAME, seed, difficulty, self.MAX_DIFFICULTY)
        rng = TaskRng.for_instance(self.NAME, seed, difficulty)
        word = rng.letters(rng.integer(difficulty + 2, difficulty + 3))
        return TaskInstance.create(self.NAME, seed, difficulty, self.prompt.format(word=word), self.transform(word))

    def score(self, completion: str, expected: str) -> float:
        """1.0 if the answer word equals `expected` ignoring case, else 0.0 (rules in answers.py)."""
        return score_word(completion, expected)


# "Reverse the word 'qzkf'." -> "fkzq"
REVERSE = WordTask("reverse", "Reverse the word '{word}'.", lambda word: word[::-1])
# "Sort the letters of 'dcba' alphabetically." -> "abcd"; letters may repeat and every copy is kept
SORT_LETTERS = WordTask("sort_letters", "Sort the letters of '{word}' alphabetically.", lambda word: "".join(sorted(word)))
# "Repeat the word 'qzk'." -> "qzk". nano is not trained on it (qwenlab.nano.train lists what it learns),
# so it is the skill an adapter adds from nothing: the built-in recipe's second specialist. Its prompt
# uses only characters nano's tokenizer was trained on.
REPEAT = WordTask("repeat", "Repeat the word '{word}'.", lambda word: word)
