"""`qwenlab train grpo` (also `qwenlab grpo`): LoRA GRPO on verifiable tasks.

The flags are the fields of qwenlab.train.grpo.GRPOConfig (`learning_rate` -> `--learning-rate`),
so the CLI and the library cannot drift. `grpo` joins the `train` verb that cli/train.py
registers when that module is listed before this one in COMMAND_MODULES; the top-level `grpo`
alias works regardless of the order.
"""

from __future__ import annotations

from qwenlab.tasks.registry import TASKS

import argparse
import types
import typing
from dataclasses import fields

from qwenlab.cli import types as flag_types

HELP = {
    "model": "base model folder, 'nano' or a hub id",
    "tasks": f"tasks: {', '.join(TASKS)}, reasoning_gym:NAME[@config.yaml], jsonl:PATH[@verifier.py:FN], mix:spec.yaml",
    "difficulty": "task difficulty (default: each task's default)", "steps": "optimizer steps",
    "batch": "prompts per step", "num_generations": "completions per prompt (the group size G)",
    "beta": "KL weight towards the base model (0: no reference pass, TRL's default)",
    "epsilon": "lower ratio clip (ε_low)", "epsilon_high": "upper ratio clip (ε_high; DAPO's clip-higher)",
    "loss_type": "grpo | dr_grpo | dapo (TRL's normalisations)", "scale_rewards": "advantage divided by the std of "
    "the group, the batch, or none", "mask_truncated_completions": "completions cut at --max-new-tokens add no loss",
    "format_reward": "reward added to completions with an <answer>...</answer> block",
    "init_adapter": "start from this PEFT adapter folder",
    "micro_batch": "rows per forward/backward pass", "save_every": "checkpoint every N steps/rounds",
    "threads": "torch CPU threads (default: torch's choice)",
    "activation_checkpointing": "recompute layer activations in the backward: auto (when a micro-batch would keep "
    "over 2 GiB), on, off",
    "dtype": "the frozen base's weights: fp32, or bf16 (faster where the CPU has AMX; the LoRA stays fp32)",
}


# Flags whose values have a range: refused at parsing, naming the flag. Other int and float fields
# get integer / finite-number parsing (a nan temperature passes every `<= 0` check downstream).
FIELD_TYPES = {
    "port": flag_types.port, "seed": flag_types.seed,
    "difficulty": flag_types.positive_int, "threads": flag_types.positive_int,
    **dict.fromkeys(("steps", "batch", "num_generations", "lora_rank", "max_new_tokens", "micro_batch",
                     "save_every", "max_record_bytes"), flag_types.positive_int),
    **dict.fromkeys(("local", "external", "rounds", "snapshot_every", "wait_for_peers"),
                    flag_types.nonnegative_int),
    "top_p": flag_types.fraction, "loss_type": flag_types.one_of("grpo", "dr_grpo", "dapo"),
    "dtype": flag_types.one_of("fp32", "bf16"),
    "activation_checkpointing": flag_types.one_of("auto", "on", "off"),
    "scale_rewards": flag_types.one_of("group", "batch", "none"),
    "external_selection": flag_types.one_of("drop_zero_advantage", "uniform"),
    **dict.fromkeys(("temperature", "learning_rate", "lora_alpha", "max_grad_norm", "epsilon", "epsilon_high",
                     "dht_timeout_s", "dht_retry_s", "record_ttl_s", "peer_timeout_s", "rate_burst", "rate_per_s",
                     "rejoin_after_s"), flag_types.positive_float),
    **dict.fromkeys(("beta", "min_round_seconds", "wait_timeout_s", "format_reward", "round_deadline_s"),
                    flag_types.nonnegative_float),
}
_DEFAULT_TYPES = {int: flag_types.integer, float: flag_types.finite_float}


def _flag_type(annotation):
    """(argparse type, is_list) for a dataclass field annotation such as `int | None` or `list[str]`."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"list": list, "str": str, "int": int, "float": float, "bool": bool})
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def add_dataclass_flags(parser, cls, skip: tuple[str, ...] = (), defaults: dict | None = None) -> None:
    """One --flag per field of dataclass `cls` (bools become --flag / --no-flag)."""
    instance = cls()
    for f in fields(cls):
        if f.name in skip:
            continue
        default = (defaults or {}).get(f.name, getattr(instance, f.name))
        kind, is_list = _flag_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        text = HELP.get(f.name, f.name.replace("_", " "))
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif is_list:
            parser.add_argument(flag, dest=f.name, default=",".join(map(str, default)),
                                help=f"{text} (comma-separated; default: %(default)s)")
        else:
            shown = "" if default is None else " (default: %(default)s)"
            parse = FIELD_TYPES.get(f.name) or _DEFAULT_TYPES.get(kind, kind)
            parser.add_argument(flag, dest=f.name, type=parse, default=default, help=text + shown)


def dataclass_from_args(cls, args, skip: tuple[str, ...] = (), **extra):
    values = {}
    for f in fields(cls):
        if f.name in skip or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        kind, is_list = _flag_type(f.type)
        if is_list and isinstance(value, str):
            value = [kind(v.strip()) for v in value.split(",") if v.strip()]
        values[f.name] = value
    return cls(**values, **extra)


def cmd_grpo(args) -> int:
    from qwenlab.train.grpo import GRPOConfig, run_grpo

    config = dataclass_from_args(GRPOConfig, args).validate()
    result = run_grpo(config, args.out, resume=args.resume)
    print(f"{args.out}: {result['steps']} steps, reward {result['first_reward']} -> {result['last_reward']}; "
          f"adapter {result['adapter']}; curve {args.out}/rewards.png")
    return 0


def add_grpo_parser(kinds, name: str = "grpo"):
    from qwenlab.train.grpo import GRPOConfig

    p = kinds.add_parser(name, help="GRPO on verifiable tasks (rewards from qwenlab.tasks)",
                         description="LoRA GRPO: G sampled completions per task prompt, scored by the task's "
                                     "verifier, group-relative advantages, TRL's loss. Writes OUT/adapter, "
                                     "OUT/checkpoint (resumable), OUT/rewards.jsonl and OUT/rewards.png.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/checkpoint when it exists (default: yes)")
    add_dataclass_flags(p, GRPOConfig)
    p.set_defaults(func=cmd_grpo, kind="grpo")
    return p


def _subcommands_of(parser):
    for action in parser._actions:  # argparse keeps sub-commands in a _SubParsersAction
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def register(subparsers) -> None:
    train = subparsers.choices.get("train")
    kinds = _subcommands_of(train) if train is not None else None
    if kinds is not None and "grpo" not in kinds.choices:
        add_grpo_parser(kinds)
    add_grpo_parser(subparsers)
