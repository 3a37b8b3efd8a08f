"""Task accuracy: greedy, batched generation on seeded task instances, scored by the task's verifier."""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm import tqdm

from qwenlab.model.generate import GenerationConfig, generate
from qwenlab.tasks import get_task, sample_instances, score_instance
from qwenlab.text_table import format_table


@dataclass
class TaskResult:
    task: str
    n: int
    correct: float
    examples: list[dict] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # per instance, in sample order: paired tests need them

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def as_dict(self) -> dict:
        return {"task": self.task, "n": self.n, "accuracy": round(self.accuracy, 4), "examples": self.examples}


def evaluate_tasks(model, tokenizer, tasks: list[str], n: int = 200, seed: int = 0, difficulty: int | None = None,
                   batch_size: int = 32, max_new_tokens: int = 24, keep_examples: int = 3,
                   progress: bool = True) -> dict[str, TaskResult]:
    """Accuracy per task over n instances each (the same instances for every model, given the seed)."""
    for task in tasks:
        get_task(task)  # unknown names fail before any work
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    results = {}
    total = sum(-(-n // batch_size) for _ in tasks)
    bar = tqdm(total=total, desc="eval", unit="batch", disable=not progress)
    for task in tasks:
        instances = sample_instances(task, n, seed=seed, difficulty=difficulty)
        result = TaskResult(task, len(instances), 0.0)
        for start in range(0, len(instances), batch_size):
            chunk = instances[start:start + batch_size]
            completions = generate(model, tokenizer, [i.prompt for i in chunk], config, chat=True)
            for instance, completion in zip(chunk, completions):
                reward = score_instance(instance, completion.text)
                result.correct += reward
                result.rewards.append(float(reward))
                if len(result.examples) < keep_examples:
                    result.examples.append({"prompt": instance.prompt, "expected": instance.expected,
                                            "completion": completion.text, "reward": reward})
            bar.update(1)
        results[task] = result
    bar.close()
    return results


def format_accuracy_table(results: dict[str, TaskResult], title: str = "") -> str:
    mean = sum(r.accuracy for r in results.values()) / max(1, len(results))
    rows = [[r.task, r.n, f"{r.accuracy:.3f}"] for r in results.values()] + [["**mean**", "", f"**{mean:.3f}**"]]
    table = format_table(["task", "n", "accuracy"], rows, markdown=True, align="lrr")
    return (f"{title}\n\n" if title else "") + table
