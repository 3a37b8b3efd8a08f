"""Stage `merge`: merge two specialists (adapters over a base, or full models) with several methods.

    - merge: {base: nano, models: [sft-arithmetic, sft-reverse], methods: [linear, ties, slerp, task_arithmetic],
              tasks: [arithmetic, reverse], n: 50}

Adapters enter the merge as `BASE+ADAPTER` references, applied tensor by tensor (no full model
is written for them). Each method's output is registered
as `merge-<method>`. The report shows every merge's accuracy on each specialist's task and the
fraction of the specialist's accuracy it keeps.
"""

from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt

from qwenlab.errors import QwenlabError
from qwenlab.recipe.stages.params import StageParams

METHODS = ("linear", "slerp", "task_arithmetic", "ties")


class Params(StageParams):
    MODEL_FIELDS = ("base", "models")
    base: str = "nano"
    models: list[str] = Field(min_length=2, max_length=2)  # the two specialists
    tasks: list[str] = Field(min_length=2, max_length=2)  # each specialist's task, in the same order
    methods: list[Literal[METHODS]] = ["linear", "ties", "slerp", "task_arithmetic"]
    n: PositiveInt = 50
    seed: NonNegativeInt = 0
    difficulty: PositiveInt | None = None

    def outputs(self) -> list[str]:
        return [f"merge-{method}" for method in self.methods]


def method_config(method: str, base: str, a: str, b: str) -> dict:
    """A mergekit-style config for two specialists over one base."""
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 0.5}},
                                                     {"model": b, "parameters": {"weight": 0.5}}]}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                "parameters": {"t": 0.5}}
    if method == "task_arithmetic":  # base + delta_a + delta_b: both task vectors at full strength
        return {"merge_method": "task_arithmetic", "base_model": base,
                "models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}]}
    if method == "ties":
        return {"merge_method": "ties", "base_model": base, "parameters": {"normalize": False},
                "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}},
                           {"model": b, "parameters": {"weight": 1.0, "density": 0.5}}]}
    raise QwenlabError(f"merge stage: unsupported method '{method}' (linear, slerp, task_arithmetic, ties)")


def merge_input(ctx, name: str, base_path: str) -> tuple[str, list[str]]:
    """(what the merge config names, adapters to load for evaluation) for a specialist."""
    path = Path(ctx.model_path(name)).resolve()
    if (path / "adapter_config.json").is_file():
        return f"{base_path}+{path}", [str(path)]
    return str(path), []


def _load(reference: str, adapters: list[str], base_path: str):
    from qwenlab.loading import load

    model, tokenizer, _ = load(base_path if adapters else reference, "fp32", adapters)
    return model, tokenizer


def run(ctx, params: Params) -> tuple[dict, str]:
    from qwenlab.eval.task_eval import evaluate_tasks
    from qwenlab.merge import merge

    base, names, tasks, methods = params.base, params.models, params.tasks, params.methods
    n, seed = params.n, params.seed
    base_path = str(Path(ctx.model_path(base)).resolve()) if base != "nano" else str(_nano())
    (a, a_adapters), (b, b_adapters) = (merge_input(ctx, name, base_path) for name in names)
    outputs = {}
    for method in methods:
        config = method_config(method, base_path, a, b)  # an unknown method fails before any folder is named
        out = ctx.new_model_dir(f"merge-{method}", "merge stage: methods")
        merge(config, out, dtype="float32", force=True, progress=False)
        outputs[f"merge-{method}"] = str(out)
    accuracy = {}
    inputs = {names[0]: (a, a_adapters), names[1]: (b, b_adapters), **{k: (v, []) for k, v in outputs.items()}}
    for label, (path, adapters) in inputs.items():
        model, tokenizer = _load(path, adapters, base_path)
        results = evaluate_tasks(model, tokenizer, tasks, n=n, seed=seed, difficulty=params.difficulty, progress=False)
        accuracy[label] = {t: round(r.accuracy, 4) for t, r in results.items()}
    specialist = {tasks[0]: accuracy[names[0]][tasks[0]], tasks[1]: accuracy[names[1]][tasks[1]]}
    kept = {m: {t: (round(accuracy[m][t] / specialist[t], 3) if specialist[t] else None) for t in tasks}
            for m in outputs}
    lines = ["| model | " + " | ".join(tasks) + " | kept of specialist (" + ", ".join(tasks) + ") |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for label, accs in accuracy.items():
        keep = ", ".join("-" if kept.get(label, {}).get(t) is None else f"{kept[label][t]:.0%}" for t in tasks) \
            if label in kept else "(specialist)"
        lines.append(f"| {label} | " + " | ".join(f"{accs[t]:.3f}" for t in tasks) + f" | {keep} |")
    table = "\n".join(lines)
    print(table)
    section = (f"## Merging the specialists\n\n{names[0]} ({tasks[0]}) and {names[1]} ({tasks[1]}) merged with "
               f"{', '.join(methods)}; greedy, {n} instances per task, seed {seed}.\n\n{table}")
    return {"accuracy": accuracy, "kept": kept, "outputs": outputs}, section


def _nano() -> Path:
    from qwenlab.checkpoint.reader import resolve_model_path

    return resolve_model_path("nano")
