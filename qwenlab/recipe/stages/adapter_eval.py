"""Stage `adapter_eval`: the base and each adapter over it, on the same seeded task instances.

    - adapter_eval: {base: nano, adapters: [sft-arithmetic, dpo-sort], tasks: [arithmetic, sort_letters], n: 100}

One base model is loaded; every adapter is attached to it unmerged and chosen per evaluation, as a
server would switch them. The table shows accuracy and the change against the base; below it, for
each adapter, the skills it gained and the base skill it kept least of (the bar: 90% of the base's
accuracy on every task where the base scores 0.2 or more).
"""

from __future__ import annotations

from pydantic import Field

from qwenlab.recipe.stages.params import EvalParams
from qwenlab.stats import PAIRED_NOTE, format_accuracy, format_change, paired_comparison

KEEP_SHARE, KEEP_FLOOR = 0.9, 0.2  # an adapter keeps a skill: >= 90% of the base's accuracy where the base has >= 0.2


class Params(EvalParams):
    MODEL_FIELDS = ("base", "adapters")
    base: str = "nano"
    adapters: list[str] = Field(min_length=1)


def run(ctx, params: Params) -> tuple[dict, str]:
    from qwenlab.adapters import active_adapters, attach_adapter
    from qwenlab.eval.task_eval import evaluate_tasks
    from qwenlab.loading import load
    from qwenlab.tasks import TASKS

    base, names = params.base, params.adapters
    tasks = params.tasks or list(TASKS)
    n, seed = params.n, params.seed
    model, tokenizer, _ = load(ctx.model_path(base), params.dtype)
    for name in names:
        attach_adapter(model, ctx.model_path(name), name)
    figures: dict[str, dict[str, float]] = {}
    rewards: dict[str, dict[str, list[float]]] = {}
    for name in [None, *names]:
        with active_adapters(model, name):
            results = evaluate_tasks(model, tokenizer, tasks, n=n, seed=seed, difficulty=params.difficulty,
                                     progress=False)
        figures[name or base] = {task: round(r.accuracy, 4) for task, r in results.items()}
        rewards[name or base] = {task: r.rewards for task, r in results.items()}
    table = _table(figures, rewards, base, tasks) + "\n\n" + _kept_lines(figures, rewards, base, tasks)
    print(table)
    title = params.title or f"Adapters over {base}: task accuracy"
    return figures, (f"## {title}\n\nGreedy, {n} instances per task, seed {seed} (the same instances for every "
                     f"row); in parentheses the change against {base}. {PAIRED_NOTE}\n\n{table}")


def _table(figures: dict[str, dict[str, float]], rewards: dict[str, dict[str, list[float]]], base: str,
           tasks: list[str]) -> str:
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for name, accuracies in figures.items():
        cells = []
        for task in tasks:
            cell = format_accuracy(accuracies[task], len(rewards[name][task]))
            if name != base:
                cell += f" ({format_change(rewards[base][task], rewards[name][task])})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _kept_lines(figures: dict[str, dict[str, float]], rewards: dict[str, dict[str, list[float]]], base: str,
                tasks: list[str]) -> str:
    """One line per adapter: its significant gains, and the base skill it kept the smallest share of."""
    lines = []
    for name in figures:
        if name == base:
            continue
        gains = [f"{t} {format_change(rewards[base][t], rewards[name][t])}" for t in tasks
                 if paired_comparison(rewards[base][t], rewards[name][t]).significant()
                 and figures[name][t] > figures[base][t]]
        held = {t: figures[name][t] / figures[base][t] for t in tasks if figures[base][t] >= KEEP_FLOOR}
        if held:
            worst = min(held, key=held.get)
            verdict = "keeps every skill" if held[worst] >= KEEP_SHARE else "forgets"
            kept = f"{verdict} ({worst} at {held[worst]:.0%} of {base}'s, the least kept)"
        else:
            kept = f"no task where {base} scores {KEEP_FLOOR} or more"
        lines.append(f"- {name}: gains {', '.join(gains) or 'nothing significant'}; {kept}.")
    return (f"Skills kept (bar: {KEEP_SHARE:.0%} of {base}'s accuracy on each task where it scores {KEEP_FLOOR} or "
            "more):\n\n" + "\n".join(lines))
