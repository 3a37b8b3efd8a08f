"""`qwenlab merge CONFIG.yaml OUT` and `qwenlab merge-search CONFIG` over qwenlab.merge."""

from __future__ import annotations

from pathlib import Path

from qwenlab.cli import types
from qwenlab.tasks.registry import TASKS
from qwenlab.errors import QwenlabError


def cmd_merge(args) -> int:
    from qwenlab.checkpoint import parse_size
    from qwenlab.errors import QwenlabError
    from qwenlab.merge import describe_plan, merge, plan_merge

    if args.dry_run:
        plan, _sources = plan_merge(args.config)
        print(describe_plan(plan, _sources))
        return 0
    if not args.out:
        raise QwenlabError("merge: OUT is required (or use --dry-run)")
    out = merge(args.config, args.out, dtype=args.dtype, force=args.force,
                max_shard_bytes=parse_size(args.max_shard_size), seed=args.seed)
    print(out)
    return 0


def cmd_merge_search(args) -> int:
    from qwenlab.merge.search import load_search_config, run_search, search_report, write_best

    if args.write_best and Path(args.write_best).exists() and not args.force:  # before hours of trials
        raise QwenlabError(f"{args.write_best}: --write-best folder exists (use --force to replace it)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    config = load_search_config(args.config, trials=args.trials, tasks=tasks, n=args.n, seed=args.seed,
                                sampler=args.sampler)
    print(f"merge search: {config.trials} trials of {config.merge.get('merge_method')} over "
          f"{', '.join(n for s in config.space for n in s.names())}; objective {', '.join(config.tasks)} "
          f"(n={config.n})", flush=True)
    result = run_search(config, args.out, storage=args.storage, study_name=args.study_name)
    print("\n" + search_report(result))
    if args.write_best:
        folder = write_best(result, args.write_best, force=args.force, dtype=config.dtype)
        print(f"best merge written to {folder} (its accuracy re-measured and recorded there)")
    print(f"wrote {args.out}/merge_search.json, best.yaml and report.md")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge models from a mergekit-style YAML config")
    p.add_argument("config", help="YAML: merge_method, models or slices, base_model, parameters, dtype, ...")
    types.add_output(p, "output model folder (not needed with --dry-run)", required=False)
    p.add_argument("--dtype", default=None, help="saved dtype (overrides out_dtype/dtype): bfloat16, float16, float32")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--max-shard-size", type=types.size, default="1GiB", help="largest output shard (default 1GiB)")
    p.add_argument("--seed", type=types.seed, default=0, help="seed of DARE/DELLA random masks (default 0)")
    p.add_argument("--dry-run", action="store_true", help="check the config and print the per-layer parameter table")
    p.set_defaults(func=cmd_merge)

    p = subparsers.add_parser("merge-search", help="tune merge parameters against task accuracy (Optuna)")
    p.add_argument("config", help="YAML: merge (a merge config), search (paths and ranges), objective")
    p.add_argument("--trials", type=types.positive_int, default=None)
    p.add_argument("--tasks", default=None, help=f"comma-separated tasks: {', '.join(TASKS)} (overrides objective.tasks)")
    p.add_argument("--n", type=types.positive_int, default=None, help="instances per task per trial")
    p.add_argument("--seed", type=types.seed, default=None)
    p.add_argument("--sampler", choices=["tpe", "random"], default=None)
    p.add_argument("--out", default="qwenlab-merge-search", help="folder for merge_search.json, best.yaml, report.md")
    p.add_argument("--write-best", default=None, metavar="DIR", help="also write the best merge as a model folder")
    p.add_argument("--force", action="store_true", help="replace --write-best's folder if it exists")
    p.add_argument("--storage", default=None, help="an Optuna storage URL (e.g. sqlite:///search.db) to resume")
    p.add_argument("--study-name", default=None)
    p.set_defaults(func=cmd_merge_search)
