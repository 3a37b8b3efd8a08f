"""The task registry: one line per task, and the helpers the rest of qwenlab calls.

Adding a task: write qwenlab/tasks/<name>.py (see base.py for its shape) and add one line to TASKS;
a word-in, word-out task is one WordTask value in word_tasks.py.
"""

from __future__ import annotations

from qwenlab.errors import QwenlabError
from qwenlab.tasks import arithmetic, count_letter
from qwenlab.tasks.base import Task, TaskInstance
from qwenlab.tasks.rng import TaskRng
from qwenlab.tasks.word_tasks import REPEAT, REVERSE, SORT_LETTERS

TASKS: dict[str, Task] = {
    "arithmetic": arithmetic,
    "reverse": REVERSE,
    "sort_letters": SORT_LETTERS,
    "count_letter": count_letter,
    "repeat": REPEAT,
}

DEFAULT_DIFFICULTY: dict[str, int] = {name: task.DEFAULT_DIFFICULTY for name, task in TASKS.items()}

# sample_instances draws seeds below this. Training data uses seeds from 10,000,000 up
# (qwenlab.nano.train.TRAIN_SEED_OFFSET), so an evaluation never reuses a training seed.
EVAL_SEED_LIMIT = 1_000_000


def get_task(name: str) -> Task:
    """The task module registered as `name`; QwenlabError naming the known tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise QwenlabError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}") from None


def generate(task: str, seed: int, difficulty: int | None = None) -> TaskInstance:
    """The instance of `task` for (seed, difficulty); difficulty None means the task's default."""
    module = get_task(task)
    return module.generate(seed, module.DEFAULT_DIFFICULTY if difficulty is None else difficulty)


def score(task: str, completion: str, expected: str) -> float:
    """The reward in [0, 1] that `task` gives `completion` against `expected`."""
    return get_task(task).score(completion, expected)


def sample_instances(task: str, n: int, seed: int, difficulty: int | None = None) -> list[TaskInstance]:
    """n instances of `task` with distinct seeds drawn deterministically from the base `seed`.

    The seeds depend on the base seed only (not on the task or difficulty), lie in
    [0, EVAL_SEED_LIMIT), and form a stable prefix: the first 100 of n=200 are the n=100 sample.
    """
    get_task(task)  # an unknown name fails before any work
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= EVAL_SEED_LIMIT:
        raise QwenlabError(f"number of instances must be an integer from 0 to {EVAL_SEED_LIMIT}, got {n!r}")
    rng = TaskRng(f"sample:{seed}")
    seeds: list[int] = []
    seen: set[int] = set()
    while len(seeds) < n:
        drawn = rng.integer(0, EVAL_SEED_LIMIT - 1)
        if drawn not in seen:  # redraw duplicates so every instance has its own seed
            seen.add(drawn)
            seeds.append(drawn)
    return [generate(task, s, difficulty) for s in seeds]
