"""reasoning_gym:NAME[@config.yaml]: any procedural dataset of reasoning-gym (PyPI `reasoning-gym`).

Items are rebuilt from (name, config, dataset seed, index), so only the index travels between peers:
the instance seed IS the index into the dataset (`dataset[seed]`; reasoning-gym draws item i from
Random(dataset_seed + i)). The config file is a YAML mapping of the dataset's own config fields
(e.g. `{min_digits: 1, max_digits: 2}` for chain_sum) plus `seed`, the dataset seed (default 0).
`reasoning_gym:composite@mix.yaml` is reasoning-gym's own weighted mixture (`datasets: [{name,
weight, config}]`), scored by the dataset each item came from.

Prompt: the question and one line asking for the answer in <answer>...</answer> tags. Score: the
dataset's own score_answer on the text of the last <answer> block, stripped (reasoning-gym's
extract_answer); no block scores 0. score_answer gives 1 for an exact answer and, for many datasets,
partial credit len(oracle)/len(answer) when the oracle is inside a longer answer.
"""

from __future__ import annotations

import difflib
import importlib.metadata
from dataclasses import fields, is_dataclass
from pathlib import Path

from qwenlab.errors import QwenlabError
from qwenlab.tasks.base import TaskInstance, TaskSource
from qwenlab.yaml_file import read_yaml

ANSWER_INSTRUCTION = "Give your final answer inside <answer></answer> tags."


def _library():
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise QwenlabError("reasoning_gym tasks need the reasoning-gym package: pip install reasoning-gym==0.1.25") \
            from None
    return reasoning_gym, DATASETS


def extract_answer(completion: str) -> str | None:
    """The stripped text of the last <answer>...</answer> block, or None (reasoning-gym's own rule)."""
    from reasoning_gym.utils import extract_answer as extract

    return extract(completion, tag_name="answer", strip=True)


class ReasoningGymTask(TaskSource):
    def __init__(self, name: str, config: dict, config_file: str | None = None):
        super().__init__()
        reasoning_gym, datasets = _library()
        where = f" ({config_file})" if config_file else ""
        if name not in datasets:
            close = difflib.get_close_matches(name, list(datasets), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; {len(datasets)} are known, e.g. chain_sum"
            raise QwenlabError(f"reasoning_gym: unknown dataset '{name}'{hint}")
        config = dict(config)
        if "size" in config:
            raise QwenlabError(f"reasoning_gym:{name}{where}: 'size' has no meaning here (items are indexed by seed)")
        dataset_seed = config.pop("seed", 0)
        if not isinstance(dataset_seed, int) or isinstance(dataset_seed, bool) or dataset_seed < 0:
            raise QwenlabError(f"reasoning_gym:{name}{where}: 'seed' must be an integer >= 0, got {dataset_seed!r}")
        self.name, self.config, self.dataset_seed = name, config, dataset_seed
        self.dataset = _create(name, config, dataset_seed, where)
        version = importlib.metadata.version("reasoning-gym")
        self.identity = {"source": "reasoning_gym", "name": name, "config": config, "seed": dataset_seed,
                         "version": version}

    def generate(self, seed: int, difficulty: int | None) -> TaskInstance:
        difficulty = self.check_difficulty(seed, difficulty)
        if seed < 0:
            raise QwenlabError(f"task '{self.NAME}': seed must be >= 0, got {seed}")
        item = self.dataset[seed]
        prompt = f"{item['question']}\n{ANSWER_INSTRUCTION}"
        return TaskInstance.create(self.NAME, seed, difficulty, prompt, str(item["answer"]), item=item)

    def score_instance(self, completion: str, instance: TaskInstance) -> float:
        item = instance.item if instance.item is not None else self.dataset[instance.seed]
        answer = extract_answer(completion)
        if not answer:
            return 0.0
        return float(self.dataset.score_answer(answer, item))

    def score(self, completion: str, expected: str) -> float:
        """Against the answer alone: right for datasets whose score_answer reads only entry['answer']."""
        answer = extract_answer(completion)
        return float(self.dataset.score_answer(answer, {"answer": expected, "metadata": {}})) if answer else 0.0

    def reference_completion(self, instance: TaskInstance) -> str:
        return f"<answer>{instance.expected}</answer>"


def _create(name: str, config: dict, seed: int, where: str):
    reasoning_gym, datasets = _library()
    _, config_cls = datasets[name]
    known = {f.name for f in fields(config_cls)} if is_dataclass(config_cls) else set()
    unknown = sorted(set(config) - known)
    if unknown:
        raise QwenlabError(f"reasoning_gym:{name}{where}: unknown config key(s) {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(known - {'seed', 'size'}))}")
    if name == "composite":
        from reasoning_gym.composite import DatasetSpec

        specs = config.get("datasets")
        if not isinstance(specs, list) or not all(isinstance(d, dict) for d in specs):
            raise QwenlabError(f"reasoning_gym:composite{where}: 'datasets' must be a list of {{name, weight, config}}")
        config = {**config, "datasets": [DatasetSpec(name=d.get("name"), weight=d.get("weight", 1.0),
                                                     config=d.get("config") or {}) for d in specs]}
    try:
        return reasoning_gym.create_dataset(name, seed=seed, **config)
    except (AssertionError, ValueError, TypeError, KeyError) as e:  # reasoning-gym validates with asserts
        raise QwenlabError(f"reasoning_gym:{name}{where}: invalid config ({type(e).__name__}: {e})") from None


def open_source(argument: str, base_dir: Path) -> ReasoningGymTask:
    """`NAME` or `NAME@config.yaml` (the path relative to base_dir)."""
    name, _, config_path = argument.partition("@")
    if not name:
        raise QwenlabError("reasoning_gym: expected reasoning_gym:NAME or reasoning_gym:NAME@config.yaml")
    config, shown = {}, None
    if config_path:
        path = base_dir / config_path
        loaded = read_yaml(path, "reasoning-gym config YAML")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise QwenlabError(f"{path}: expected a mapping of {name}'s config fields, got {type(loaded).__name__}")
        config, shown = loaded, str(path)
    return ReasoningGymTask(name, config, shown)
