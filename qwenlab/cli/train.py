"""`qwenlab train sft|dpo` (LoRA on TRL) and `qwenlab data sft|dpo` (training sets from verifiable tasks)."""

from __future__ import annotations

from qwenlab.cli import types
from qwenlab.tasks.registry import TASKS


def cmd_train(args) -> int:
    from pathlib import Path

    from qwenlab.errors import QwenlabError

    # Checked before the trainer's imports (torch, transformers: seconds), as load_jsonl checks it again.
    for data in (args.data, getattr(args, "eval_data", None)):
        if data and Path(data).is_dir():
            raise QwenlabError(f"{data}: expected a JSONL data file, found a folder")
        if data and not Path(data).exists():
            raise QwenlabError(f"{data}: data file not found")
    from qwenlab.train import load_train_config, train_dpo, train_sft
    from qwenlab.train.config import config_overrides

    config = load_train_config(args.config, config_overrides(args))
    result = (train_sft if args.kind == "sft" else train_dpo)(config)
    losses = f"mean train loss {result.train_loss:.4f}" if result.train_loss is not None else "no loss logged"
    if result.eval_loss is not None:
        losses += f", eval loss {result.eval_loss:.4f}"
    speed = f", {result.tokens_per_s:.0f} tokens/s" if result.tokens_per_s else ""
    print(f"{result.out}: {result.steps} steps, {losses}, {result.runtime_s:.0f} s{speed}")
    return 0


def cmd_data(args) -> int:
    from qwenlab.train.data import dpo_records_from_task, sft_records_from_task, write_jsonl

    if args.kind == "sft":
        records = sft_records_from_task(args.task, args.n, seed=args.seed, difficulty=args.difficulty)
    else:
        records = dpo_records_from_task(args.task, args.n, seed=args.seed, difficulty=args.difficulty,
                                        rejected_from=args.rejected_from)
    out = write_jsonl(records, args.out, force=args.force)
    print(f"{out}: {len(records)} {args.kind.upper()} records of task '{args.task}'")
    return 0


def register(subparsers) -> None:
    from qwenlab.train.config import add_config_flags

    train = subparsers.add_parser("train", help="train a LoRA adapter with TRL (sft or dpo)")
    kinds = train.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, text in (("sft", "supervised fine-tuning on messages or prompt/completion JSONL"),
                       ("dpo", "direct preference optimisation on prompt/chosen/rejected JSONL")):
        p = kinds.add_parser(kind, help=text, description=f"LoRA {kind.upper()}: {text}. Options come from "
                             "--config YAML (same names, with underscores) and flags, flags winning.")
        p.add_argument("--config", default=None, help="a YAML file of the options below")
        add_config_flags(p, kind)
        p.set_defaults(func=cmd_train, kind=kind)

    data = subparsers.add_parser("data", help="write a training JSONL from a verifiable task")
    kinds = data.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, text in (("sft", "chat prompt/completion pairs with the verified answer"),
                       ("dpo", "chat prompt/chosen/rejected: a correct answer over a wrong or badly formatted one")):
        p = kinds.add_parser(kind, help=text)
        types.add_output(p, "the JSONL file to write")
        p.add_argument("--task", "--tasks", dest="task", required=True, type=types.task_spelling,
                       help=f"a task: {', '.join(TASKS)}, reasoning_gym:NAME[@config.yaml], jsonl:PATH"
                            "[@verifier.py:FN] or mix:spec.yaml")
        p.add_argument("--n", type=types.positive_int, required=True, help="number of records")
        p.add_argument("--seed", type=types.seed, default=0, help="data seed (instances never overlap evaluation's)")
        p.add_argument("--difficulty", type=types.positive_int, default=None, help="default: the task's default difficulty")
        p.add_argument("--force", action="store_true", help="replace an existing file")
        if kind == "dpo":
            p.add_argument("--rejected-from", default=None, metavar="MODEL",
                           help="use this model's own wrong greedy replies as rejected (on-policy pairs)")
        p.set_defaults(func=cmd_data, kind=kind)
