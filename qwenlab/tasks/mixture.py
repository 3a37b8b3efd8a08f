"""mix:spec.yaml: a weighted mixture of task sources.

    seed: 0                       # optional: which component each seed picks depends on it
    tasks:
      - {task: arithmetic, weight: 2}
      - {task: "reasoning_gym:chain_sum", config: {min_terms: 2, max_terms: 2, max_digits: 2}}
      - {task: "jsonl:gsm8k_small.jsonl"}

Each entry is any task spelling (paths relative to the spec's folder), a weight (default 1) and, for
a reasoning_gym entry, its config inline. Instance `seed` picks its component by weight with a
deterministic draw of (mixture seed, seed), then the component builds its own instance from the same
seed: a peer rebuilds it from the index alone. The identity lists every component's identity and weight.
"""

from __future__ import annotations

from pathlib import Path

from qwenlab.errors import QwenlabError
from qwenlab.tasks.base import TaskInstance, TaskSource
from qwenlab.tasks.rng import TaskRng
from qwenlab.yaml_file import read_yaml

_ENTRY_KEYS = {"task", "weight", "config"}


class MixtureTask(TaskSource):
    def __init__(self, components: list[tuple[str, TaskSource, float]], seed: int, where: str):
        super().__init__()
        self.components, self.seed, self.where = components, seed, where
        self.total_weight = sum(w for _, _, w in components)
        self.identity = {"source": "mix", "seed": seed,
                         "components": [{"identity": s.identity, "weight": w} for _, s, w in components]}

    def component(self, seed: int) -> tuple[str, TaskSource]:
        point = TaskRng(f"mix:{self.seed}:{seed}").fraction() * self.total_weight
        for label, source, weight in self.components:
            point -= weight
            if point < 0:
                return label, source
        label, source, _ = self.components[-1]
        return label, source

    def generate(self, seed: int, difficulty: int | None) -> TaskInstance:
        difficulty = self.check_difficulty(seed, difficulty)
        label, source = self.component(seed)
        inner = source.generate(seed, None)
        item = {"component": label, "item": inner.item}
        return TaskInstance.create(self.NAME, seed, difficulty, inner.prompt, inner.expected, item=item)

    def _inner(self, instance: TaskInstance) -> tuple[TaskSource, TaskInstance]:
        _, source = self.component(instance.seed)
        return source, source.generate(instance.seed, None)

    def score_instance(self, completion: str, instance: TaskInstance) -> float:
        source, inner = self._inner(instance)
        return source.score_instance(completion, inner)

    def reference_completion(self, instance: TaskInstance) -> str:
        source, inner = self._inner(instance)
        return source.reference_completion(inner)


def open_source(argument: str, base_dir: Path) -> MixtureTask:
    from qwenlab.tasks.reasoning_gym_task import ReasoningGymTask
    from qwenlab.tasks.registry import open_task

    path = base_dir / argument
    spec = read_yaml(path, "mixture spec YAML")
    if not isinstance(spec, dict) or not isinstance(spec.get("tasks"), list) or not spec["tasks"]:
        raise QwenlabError(f"{path}: expected a mapping with a non-empty 'tasks' list")
    unknown = set(spec) - {"tasks", "seed"}
    if unknown:
        raise QwenlabError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (expected tasks, seed)")
    seed = spec.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise QwenlabError(f"{path}: 'seed' must be an integer, got {seed!r}")
    components = []
    for number, entry in enumerate(spec["tasks"], 1):
        if isinstance(entry, str):
            entry = {"task": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("task"), str) or set(entry) - _ENTRY_KEYS:
            raise QwenlabError(f"{path}: task {number}: expected {{task: NAME, weight: W, config: {{...}}}}")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise QwenlabError(f"{path}: task {number}: weight must be a number > 0, got {weight!r}")
        spelling = entry["task"]
        if spelling.startswith("mix:"):
            raise QwenlabError(f"{path}: task {number}: a mixture inside a mixture is not supported")
        if "config" in entry:
            kind, _, name = spelling.partition(":")
            if kind != "reasoning_gym" or "@" in name or not isinstance(entry["config"], dict):
                raise QwenlabError(f"{path}: task {number}: an inline 'config' mapping is for reasoning_gym:NAME")
            source = ReasoningGymTask(name, entry["config"], f"{path}, task {number}")
            source.NAME = f"{spelling}{entry['config']}"
        else:
            source = open_task(spelling, path.parent)
        components.append((source.NAME, source, float(weight)))
    return MixtureTask(components, seed, str(path))
