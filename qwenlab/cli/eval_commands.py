"""`qwenlab eval`: task accuracy of a model (greedy, batched, with the model core)."""

from __future__ import annotations

import json


def cmd_eval(args) -> int:
    from qwenlab.bench.task_eval import evaluate_tasks, format_accuracy_table
    from qwenlab.cli.model_commands import load_for_generation
    from qwenlab.tasks import TASKS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(TASKS)
    model, tokenizer, checkpoint = load_for_generation(args.model, args.dtype)
    results = evaluate_tasks(model, tokenizer, tasks, n=args.n, seed=args.seed, difficulty=args.difficulty,
                             batch_size=args.batch_size, progress=not args.json)
    if args.json:
        print(json.dumps({"model": str(checkpoint.path), "seed": args.seed,
                          "tasks": {k: v.as_dict() for k, v in results.items()}}, indent=2))
    else:
        print(format_accuracy_table(results, title=f"{checkpoint.path} (seed {args.seed}, greedy)"))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="accuracy per task on seeded, verifiable task instances")
    p.add_argument("model", help="a model folder or 'nano'")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    p.add_argument("--n", type=int, default=200, help="instances per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", type=int, default=None, help="default: each task's default difficulty")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
