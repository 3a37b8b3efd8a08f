"""The merge verb: `qwenlab merge CONFIG.yaml OUT` over qwenlab.merge."""

from __future__ import annotations

from qwenlab.cli import types


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


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge models from a mergekit-style YAML config")
    p.add_argument("config", help="YAML: merge_method, models or slices, base_model, parameters, dtype, ...")
    p.add_argument("out", nargs="?", help="output model folder (not needed with --dry-run)")
    p.add_argument("--dtype", default=None, help="saved dtype (overrides out_dtype/dtype): bfloat16, float16, float32")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--max-shard-size", type=types.size, default="1GiB", help="largest output shard (default 1GiB)")
    p.add_argument("--seed", type=types.seed, default=0, help="seed of DARE/DELLA random masks (default 0)")
    p.add_argument("--dry-run", action="store_true", help="check the config and print the per-layer parameter table")
    p.set_defaults(func=cmd_merge)
