"""`qwenlab ls`: every variant with its lineage, size and latest figures (qwenlab.variants); `ls --cache`: the
Hugging Face cache's repositories."""

from __future__ import annotations

import json

from qwenlab.errors import QwenlabError


def cmd_ls(args) -> int:
    if args.cache:
        return _ls_cache(args)
    if not args.paths:
        raise QwenlabError("ls: give one or more folders (or --cache for the Hugging Face cache)")
    from qwenlab.variants.listing import format_listing, list_variants

    rows = list_variants(args.paths)
    print(json.dumps(rows, indent=2, default=str) if args.json else format_listing(rows, markdown=args.markdown))
    return 0


def _ls_cache(args) -> int:
    from qwenlab.checkpoint.hub import cached_repositories
    from qwenlab.model.info import human_bytes
    from qwenlab.text_table import format_table

    repos = cached_repositories()
    if args.json:
        print(json.dumps(repos, indent=2))
        return 0
    rows = [[r["id"], r["kind"], human_bytes(r["size_bytes"]), ", ".join(r["revisions"])] for r in repos]
    print(format_table(["id", "kind", "size", "revisions"], rows, markdown=args.markdown, align="llrl")
          if rows else "the Hugging Face cache is empty")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("ls", help="variants with lineage, size, parameters, dtype and latest figures")
    p.add_argument("paths", nargs="*", metavar="DIR", help="model/adapter folders, folders holding them, or 'nano'")
    p.add_argument("--cache", action="store_true", help="list the Hugging Face cache's repositories with their size")
    p.add_argument("--json", action="store_true")
    p.add_argument("--markdown", action="store_true", help="a Markdown table")
    p.set_defaults(func=cmd_ls)
