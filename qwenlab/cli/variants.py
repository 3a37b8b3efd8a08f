"""`qwenlab ls`: every variant with its lineage, size and latest figures (qwenlab.variants)."""

from __future__ import annotations

import json


def cmd_ls(args) -> int:
    from qwenlab.variants.listing import format_listing, list_variants

    rows = list_variants(args.paths)
    print(json.dumps(rows, indent=2, default=str) if args.json else format_listing(rows, markdown=args.markdown))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("ls", help="variants with lineage, size, parameters, dtype and latest figures")
    p.add_argument("paths", nargs="+", metavar="DIR", help="model/adapter folders, folders holding them, or 'nano'")
    p.add_argument("--json", action="store_true")
    p.add_argument("--markdown", action="store_true", help="a Markdown table")
    p.set_defaults(func=cmd_ls)
