"""Seeded, verifiable tasks: the built-in ones and task sources (reasoning-gym, JSONL, mixtures).

Each task module has generate(seed, difficulty) -> TaskInstance and score(completion, expected)
-> float in [0, 1]; registry.py lists them and parses the `KIND:ARGUMENT` spelling of the other
sources. An instance is rebuilt from (task, seed, difficulty) alone, on any machine and Python
version, so peers can re-score each other's rollouts.
"""

from qwenlab.tasks.base import TaskInstance, TaskSource
from qwenlab.tasks.registry import (
    DEFAULT_DIFFICULTY,
    EVAL_SEED_LIMIT,
    SOURCES,
    TASKS,
    generate,
    get_task,
    parse_task_list,
    sample_instances,
    score,
    score_instance,
)

__all__ = ["DEFAULT_DIFFICULTY", "EVAL_SEED_LIMIT", "SOURCES", "TASKS", "TaskInstance", "TaskSource", "generate",
           "get_task", "parse_task_list", "sample_instances", "score", "score_instance"]
