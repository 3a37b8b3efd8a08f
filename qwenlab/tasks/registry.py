"""The task registry: one line per built-in task, one per kind of task source, and the one parser of
the spelling that `--tasks` (eval, grpo, swarm, data) and `task`/`tasks` in recipes use:

    arithmetic                          a built-in task (TASKS)
    reasoning_gym:NAME[@config.yaml]    a reasoning-gym dataset with its config (reasoning_gym_task.py)
    jsonl:PATH                          question/answer rows, scored by math-verify (jsonl_task.py)
    jsonl:PATH@verifier.py:FN           the same rows, scored by FN(completion, item) -> float
    mix:spec.yaml                       a weighted mixture of any of the above (mixture.py)

Adding a task: write qwenlab/tasks/<name>.py (see base.py for its shape) and add one line to TASKS;
a word-in, word-out task is one WordTask value in word_tasks.py. Adding a kind of source: one file
with `open_source(argument, base_dir) -> TaskSource` and one line in SOURCES.
"""

from __future__ import annotations

from pathlib import Path

from qwenlab.errors import QwenlabError
from qwenlab.tasks import arithmetic, count_letter, jsonl_task, mixture, reasoning_gym_task
from qwenlab.tasks.base import BuiltinTask, Task, TaskInstance, TaskSource
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

SOURCES = {
    "reasoning_gym": reasoning_gym_task.open_source,
    "jsonl": jsonl_task.open_source,
    "mix": mixture.open_source,
}

# sample_instances draws seeds below this. Training data uses seeds from 10,000,000 up
# (qwenlab.nano.train.TRAIN_SEED_OFFSET), so an evaluation never reuses a training seed.
EVAL_SEED_LIMIT = 1_000_000


_OPENED: dict[tuple[str, str], TaskSource] = {}  # (spelling, base folder) -> source: files are read once


def open_task(spelling: str, base_dir: str | Path | None = None) -> TaskSource:
    """The TaskSource a spelling names (relative paths from `base_dir`, default the working folder)."""
    if not isinstance(spelling, str) or not spelling.strip():
        raise QwenlabError(f"a task must be a non-empty name, got {spelling!r}")
    spelling = spelling.strip()
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    key = (spelling, str(base))
    if key in _OPENED:
        return _OPENED[key]
    if spelling in TASKS:
        source: TaskSource = BuiltinTask(TASKS[spelling])
    elif ":" in spelling:
        kind, argument = spelling.split(":", 1)
        if kind not in SOURCES:
            raise QwenlabError(f"task '{spelling}': unknown kind '{kind}'; known kinds: {', '.join(SOURCES)} "
                               f"(or a built-in task: {', '.join(TASKS)})")
        source = SOURCES[kind](argument, base)
        source.NAME = spelling
    else:
        raise QwenlabError(f"unknown task '{spelling}'; known tasks: {', '.join(TASKS)}")
    if len(_OPENED) > 256:  # bounded: a long-lived process opening many files
        _OPENED.clear()
    _OPENED[key] = source
    return source


def get_task(name: str) -> TaskSource:
    """The task source `name` spells (see the module docstring); one QwenlabError line otherwise."""
    return open_task(name)


def parse_task_list(text: str | list[str] | None) -> list[str]:
    """`--tasks a,b` or a recipe's list -> task spellings, each checked (files read, names known)."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    tasks = [t.strip() for t in items if isinstance(t, str) and t.strip()]
    for task in tasks:
        get_task(task)
    return tasks


def generate(task: str, seed: int, difficulty: int | None = None) -> TaskInstance:
    """The instance of `task` for (seed, difficulty); difficulty None means the task's default."""
    source = get_task(task)
    return source.generate(seed, source.DEFAULT_DIFFICULTY if difficulty is None else difficulty)


def score(task: str, completion: str, expected: str) -> float:
    """The reward in [0, 1] that `task` gives `completion` against `expected` (sources that need only that)."""
    return get_task(task).score(completion, expected)


def score_instance(instance: TaskInstance, completion: str) -> float:
    """The reward in [0, 1] for `completion` on `instance`; a verifier that fails scores 0, reported."""
    return get_task(instance.task).safe_score(completion, instance)


def sample_instances(task: str, n: int, seed: int, difficulty: int | None = None) -> list[TaskInstance]:
    """n instances of `task` with distinct seeds drawn deterministically from the base `seed`.

    The seeds depend on the base seed only (not on the task or difficulty), lie in
    [0, EVAL_SEED_LIMIT), and form a stable prefix: the first 100 of n=200 are the n=100 sample.
    """
    source = get_task(task)  # an unknown name fails before any work
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= EVAL_SEED_LIMIT:
        raise QwenlabError(f"number of instances must be an integer from 0 to {EVAL_SEED_LIMIT}, got {n!r}")
    rng = TaskRng(f"sample:{seed}")
    if source.size is not None:  # a finite file: distinct rows in a seeded order (all of them at most)
        rows = list(range(source.size))
        rng.shuffle(rows)
        return [generate(task, s, difficulty) for s in rows[:n]]
    seeds: list[int] = []
    seen: set[int] = set()
    while len(seeds) < n:
        drawn = rng.integer(0, EVAL_SEED_LIMIT - 1)
        if drawn not in seen:  # redraw duplicates so every instance has its own seed
            seen.add(drawn)
            seeds.append(drawn)
    return [generate(task, s, difficulty) for s in seeds]
