"""Stage `eval`: task accuracy of one or more models on the same seeded instances."""

from qwenlab.eval.task_eval import evaluate_tasks
from qwenlab.loading import load
from qwenlab.recipe.stages.params import EvalParams
from qwenlab.stats import format_accuracy
from qwenlab.tasks import TASKS


class Params(EvalParams):
    MODEL_FIELDS = ("model", "models")
    model: str = "nano"
    models: list[str] | None = None


def run(ctx, params: Params) -> tuple[dict, str]:
    names = params.models or [params.model]
    tasks = params.tasks or list(TASKS)
    n, seed = params.n, params.seed
    figures = {}
    for name in names:
        model, tokenizer, _ = load(ctx.model_path(name), params.dtype)
        results = evaluate_tasks(model, tokenizer, tasks, n=n, seed=seed, difficulty=params.difficulty)
        figures[name] = {task: round(r.accuracy, 4) for task, r in results.items()}
    header = "| model | " + " | ".join(tasks) + " | mean |"
    lines = [header, "|---|" + "---:|" * (len(tasks) + 1)]
    for name, accs in figures.items():
        mean = sum(accs.values()) / len(accs)
        lines.append(f"| {name} | " + " | ".join(format_accuracy(accs[t], n) for t in tasks) + f" | {mean:.3f} |")
    table = "\n".join(lines)
    print(table)
    title = params.title or "Task accuracy"
    return figures, (f"## {title}\n\nGreedy, {n} instances per task, seed {seed}; brackets: 95% Wilson "
                     f"interval.\n\n{table}")
