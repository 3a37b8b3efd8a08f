"""`qwenlab compare` and `qwenlab card`: reports across variants (qwenlab.report)."""

from __future__ import annotations

import sys

from qwenlab.cli import types
from qwenlab.tasks.registry import TASKS


def cmd_compare(args) -> int:
    from qwenlab.report.compare import expand_inputs, main_table, write_comparison

    if args.measure:
        from qwenlab.report.measure import measure_missing

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(TASKS)
        variants, _, _ = expand_inputs(args.inputs)
        for line in measure_missing({str(v.path): str(v.path) for v in variants}, tasks, n=args.n, seed=args.seed):
            print(f"measured {line}", file=sys.stderr)
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


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="one table, plots and a recommendation across variants")
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_MODEL",
                   help="model/adapter folders, folders holding them, recipe run folders, merge-search folders")
    p.add_argument("--out", default="qwenlab-compare", help="output folder (default: qwenlab-compare)")
    p.add_argument("--title", default="qwenlab compare")
    p.add_argument("--measure", action="store_true",
                   help="first measure (and record) task accuracy where a variant has no figure at this n and seed")
    p.add_argument("--tasks", default=None, help=f"with --measure: comma-separated tasks: {', '.join(TASKS)} "
                                                 "(default: all)")
    p.add_argument("--n", type=types.positive_int, default=50, help="with --measure: instances per task")
    p.add_argument("--seed", type=types.seed, default=0, help="with --measure: the evaluation seed")
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
