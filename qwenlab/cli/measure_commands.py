"""Measure and choose: `qwenlab ls`, `compare`, `card`, `merge-search`."""

from __future__ import annotations

import json
from pathlib import Path

from qwenlab.cli import types
from qwenlab.errors import QwenlabError


def cmd_ls(args) -> int:
    from qwenlab.variants.listing import format_listing, list_variants

    rows = list_variants(args.paths)
    print(json.dumps(rows, indent=2, default=str) if args.json else format_listing(rows, markdown=args.markdown))
    return 0


def cmd_compare(args) -> int:
    from qwenlab.report.compare import main_table, write_comparison

    comparison, files = write_comparison(args.inputs, args.out, title=args.title)
    print(main_table(comparison, markdown=False))
    print(f"\n{comparison.recommendation.replace('**', '')}")
    for note in comparison.notes:
        print(f"note: {note}")
    print(f"\nwrote {files['markdown']}, {files['html']} and {len(files) - 3} plot(s) in {args.out}")
    return 0


def cmd_card(args) -> int:
    from qwenlab.report.card import build_card, validate_card, write_card

    options = {"variants": args.variants or None, "base_model": args.base_model, "license": args.license}
    if args.print:
        text = build_card(args.model, **options)
        validate_card(text)
        print(text)
        return 0
    path = write_card(args.model, args.out, **options)
    print(f"wrote {path}")
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
    p = subparsers.add_parser("ls", help="variants with lineage, size, parameters, dtype and latest figures")
    p.add_argument("paths", nargs="+", metavar="DIR", help="model/adapter folders, folders holding them, or 'nano'")
    p.add_argument("--json", action="store_true")
    p.add_argument("--markdown", action="store_true", help="a Markdown table")
    p.set_defaults(func=cmd_ls)

    p = subparsers.add_parser("compare", help="one table, plots and a recommendation across variants")
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_MODEL",
                   help="model/adapter folders, folders holding them, recipe run folders, merge-search folders")
    p.add_argument("--out", default="qwenlab-compare", help="output folder (default: qwenlab-compare)")
    p.add_argument("--title", default="qwenlab compare")
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser("card", help="write a Hugging Face model card (README.md) from measured figures")
    p.add_argument("model", help="a model or adapter folder, or 'nano'")
    p.add_argument("--out", default=None, help="file or folder (default: MODEL/README.md)")
    p.add_argument("--variants", nargs="*", default=None, metavar="DIR",
                   help="other variants to list side by side, with a recommendation")
    p.add_argument("--base-model", default=None, help="the Hub id of the base model for the metadata")
    p.add_argument("--license", default=None, help="license id (default: the base's card, else 'unknown')")
    p.add_argument("--print", action="store_true", help="print the card instead of writing it")
    p.set_defaults(func=cmd_card)

    p = subparsers.add_parser("merge-search", help="tune merge parameters against task accuracy (Optuna)")
    p.add_argument("config", help="YAML: merge (a merge config), search (paths and ranges), objective")
    p.add_argument("--trials", type=types.positive_int, default=None)
    p.add_argument("--tasks", default=None, help="comma-separated tasks (overrides objective.tasks)")
    p.add_argument("--n", type=types.positive_int, default=None, help="instances per task per trial")
    p.add_argument("--seed", type=types.seed, default=None)
    p.add_argument("--sampler", choices=["tpe", "random"], default=None)
    p.add_argument("--out", default="qwenlab-merge-search", help="folder for merge_search.json, best.yaml, report.md")
    p.add_argument("--write-best", default=None, metavar="DIR", help="also write the best merge as a model folder")
    p.add_argument("--force", action="store_true", help="replace --write-best's folder if it exists")
    p.add_argument("--storage", default=None, help="an Optuna storage URL (e.g. sqlite:///search.db) to resume")
    p.add_argument("--study-name", default=None)
    p.set_defaults(func=cmd_merge_search)
