"""Stage `eval`: task accuracy of one or more models on the same seeded instances."""

from qwenlab.bench.task_eval import evaluate_tasks
from qwenlab.cli.model_commands import load_for_generation
from qwenlab.tasks import TASKS


def run(ctx, params: dict) -> tuple[dict, str]:
    names = params.get("models") or [params.get("model", "nano")]
    tasks = params.get("tasks") or list(TASKS)
    n, seed = int(params.get("n", 100)), int(params.get("seed", 0))
    figures = {}
    for name in names:
        model, tokenizer, _ = load_for_generation(ctx.model_path(name), params.get("dtype", "fp32"))
        results = evaluate_tasks(model, tokenizer, tasks, n=n, seed=seed, difficulty=params.get("difficulty"))
        figures[name] = {task: round(r.accuracy, 4) for task, r in results.items()}
    header = "| model | " + " | ".join(tasks) + " | mean |"
    lines = [header, "|---|" + "---:|" * (len(tasks) + 1)]
    for name, accs in figures.items():
        mean = sum(accs.values()) / len(accs)
        lines.append(f"| {name} | " + " | ".join(f"{accs[t]:.3f}" for t in tasks) + f" | {mean:.3f} |")
    table = "\n".join(lines)
    print(table)
    title = params.get("title", "Task accuracy")
    return figures, f"## {title}\n\nGreedy, {n} instances per task, seed {seed}.\n\n{table}"
