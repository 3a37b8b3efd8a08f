"""`qwenlab adapter merge|extract|combine`: LoRA adapters in PEFT format, base + adapter folders out."""

from __future__ import annotations

import argparse
import json

from qwenlab.cli import types
from qwenlab.errors import QwenlabError


def cmd_merge(args) -> int:
    from qwenlab.adapters import merge_adapter_into_folder

    out = merge_adapter_into_folder(args.base, args.adapter, args.out, dtype=args.dtype, force=args.force)
    print(out)
    return 0


def cmd_extract(args) -> int:
    from qwenlab.adapters.extract import extract_adapter_to_folder

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    report = extract_adapter_to_folder(args.base, args.finetuned, args.out, args.rank, targets, force=args.force)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    worst = min(report.energy.items(), key=lambda kv: kv[1])
    print(f"{args.out}: rank {report.rank} over {len(report.energy)} linears; energy captured "
          f"{report.total_energy:.4f} overall, lowest {worst[1]:.4f} ({worst[0]})")
    if report.unchanged:
        print(f"  {len(report.unchanged)} linears unchanged (left out)")
    if report.not_captured:
        more = f" and {len(report.not_captured) - 5} more" if len(report.not_captured) > 5 else ""
        print(f"  warning: {len(report.not_captured)} non-linear tensors differ and are NOT in the adapter: "
              f"{', '.join(report.not_captured[:5])}{more}")
    return 0


def cmd_combine(args) -> int:
    from qwenlab.adapters.combine import combine_adapters_to_folder

    weights = None
    if args.weights:
        try:
            weights = [types.finite_float(w) for w in args.weights.split(",")]
        except argparse.ArgumentTypeError:
            raise QwenlabError(f"--weights: expected comma-separated finite numbers, got '{args.weights}'") from None
    report = combine_adapters_to_folder(args.adapters, args.out, weights=weights, method=args.method, rank=args.rank,
                                        density=args.density, majority=args.majority_sign, seed=args.seed,
                                        force=args.force)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    energy = f", energy kept {min(report.energy.values()):.4f} (lowest module)" if report.energy else " (exact)"
    print(f"{args.out}: {args.method} of {len(args.adapters)} adapters, rank {report.rank}{energy}")
    return 0


def register(subparsers) -> None:
    adapter = subparsers.add_parser("adapter", help="LoRA adapters: merge into a base, extract, combine")
    verbs = adapter.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("merge", help="write BASE with ADAPTER folded in (W + B·A·alpha/r) as a model folder")
    p.add_argument("base", help="the base model folder or 'nano'")
    p.add_argument("adapter", help="a PEFT LoRA adapter folder")
    types.add_output(p, "the merged model folder to write")
    p.add_argument("--dtype", default=None, help="output dtype (default: the base's)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = verbs.add_parser("extract", help="a rank-r LoRA of FINETUNED - BASE (truncated SVD per linear)")
    p.add_argument("base")
    p.add_argument("finetuned")
    types.add_output(p, "the adapter folder to write")
    p.add_argument("--rank", type=types.positive_int, required=True)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="linear modules to extract (comma-separated)")
    p.add_argument("--json", action="store_true", help="print the energy report as JSON")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_extract)

    p = verbs.add_parser("combine", help="one adapter from several: cat (exact), svd, ties, dare_linear, "
                                         "dare_ties, linear")
    p.add_argument("out", metavar="OUT", help="the adapter folder to write (or --out OUT, then every positional "
                   "is an input)")
    p.add_argument("adapters", nargs="+", help="two or more adapter folders of the same base")
    p.add_argument("--out", dest="out_option", default=None, metavar="OUT", help="the same as OUT")
    p.set_defaults(output_required=True, output_first=True)
    p.add_argument("--method", default="cat", choices=["cat", "svd", "ties", "dare_linear", "dare_ties", "linear"])
    p.add_argument("--weights", default=None, help="one weight per adapter, comma-separated (default: 1 each)")
    p.add_argument("--rank", type=types.positive_int, default=None, help="svd/ties/dare: output rank (default: the largest input)")
    p.add_argument("--density", type=types.fraction, default=1.0, help="ties/dare: fraction of each delta kept")
    p.add_argument("--majority-sign", default="total", choices=["total", "frequency"], help="ties: sign election")
    p.add_argument("--seed", type=types.seed, default=0, help="dare: seed of the random drop")
    p.add_argument("--json", action="store_true")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_combine)
