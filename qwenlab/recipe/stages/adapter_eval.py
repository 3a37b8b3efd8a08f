"""Stage `adapter_eval`: the base and each adapter over it, on the same seeded task instances.

    - adapter_eval: {base: nano, adapters: [sft-arithmetic, dpo-sort], tasks: [arithmetic, sort_letters], n: 100}

One base model is loaded; every adapter is attached to it unmerged and chosen per evaluation, as a
server would switch them. The table shows accuracy and the change against the base.
"""

from __future__ import annotations

from qwenlab.errors import QwenlabError


def run(ctx, params: dict) -> tuple[dict, str]:
    from qwenlab.adapters import active_adapters, attach_adapter
    from qwenlab.bench.task_eval import evaluate_tasks
    from qwenlab.cli.model_commands import load_for_generation
    from qwenlab.tasks import TASKS

    base = params.get("base", "nano")
    names = params.get("adapters") or []
    if not names:
        raise QwenlabError("adapter_eval stage: 'adapters' must list at least one adapter name")
    tasks = params.get("tasks") or list(TASKS)
    n, seed = int(params.get("n", 100)), int(params.get("seed", 0))
    model, tokenizer, _ = load_for_generation(ctx.model_path(base), params.get("dtype", "fp32"))
    for name in names:
        attach_adapter(model, ctx.model_path(name), name)
    figures: dict[str, dict[str, float]] = {}
    for name in [None, *names]:
        with active_adapters(model, name):
            results = evaluate_tasks(model, tokenizer, tasks, n=n, seed=seed, difficulty=params.get("difficulty"),
                                     progress=False)
        figures[name or base] = {task: round(r.accuracy, 4) for task, r in results.items()}
    table = _table(figures, base, tasks)
    print(table)
    title = params.get("title", f"Adapters over {base}: task accuracy")
    return figures, (f"## {title}\n\nGreedy, {n} instances per task, seed {seed} (the same instances for every "
                     f"row); in brackets the change against {base}.\n\n{table}")


def _table(figures: dict[str, dict[str, float]], base: str, tasks: list[str]) -> str:
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for name, accuracies in figures.items():
        cells = []
        for task in tasks:
            cell = f"{accuracies[task]:.3f}"
            if name != base:
                cell += f" ({accuracies[task] - figures[base][task]:+.3f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
