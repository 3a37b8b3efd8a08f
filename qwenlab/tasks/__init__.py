"""Seeded, procedurally generated, verifiable tasks.

Each task module has generate(seed, difficulty) -> TaskInstance and score(completion, expected)
-> float in [0, 1]; registry.py lists them. An instance is rebuilt from (task, seed, difficulty)
alone, on any machine and Python version, so peers can re-score each other's rollouts.
"""

from qwenlab.tasks.base import TaskInstance
from qwenlab.tasks.registry import (
    DEFAULT_DIFFICULTY,
    EVAL_SEED_LIMIT,
    TASKS,
    generate,
    get_task,
    sample_instances,
    score,
)

__all__ = ["DEFAULT_DIFFICULTY", "EVAL_SEED_LIMIT", "TASKS", "TaskInstance", "generate", "get_task",
           "sample_instances", "score"]
