"""argparse types for numeric flags: a bad value is refused at parsing, naming the flag (exit 2).

Each returns the parsed value or raises argparse.ArgumentTypeError, which argparse prints as
`qwenlab VERB: error: argument --flag: <message>`.
"""

from __future__ import annotations

import argparse
import math

# Seeds seed torch.Generator: signed 64-bit, non-negative (qwenlab.model.generate.MAX_SEED; not imported
# from there, so that parsing the command line does not import torch).
MAX_SEED = 2**63 - 1


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):  # nan/inf poison every later comparison and tensor
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def integer(text: str) -> int:
    return _int(text)


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to 2**63-1, got {value}")
    return value


def port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port from 0 to 65535, got {value}")
    return value


def finite_float(text: str) -> float:
    return _float(text)


def nonnegative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]: top-p, density."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def size(text: str) -> int:
    """A byte size ('2GB', '500MB', a byte count), at least one byte."""
    from qwenlab.checkpoint import parse_size
    from qwenlab.errors import QwenlabError

    try:
        value = parse_size(text)
    except (QwenlabError, OverflowError):  # OverflowError: 'infGB'
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 500MB or a byte count, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a size of at least 1 byte, got {text!r}")
    return value


# ---- outputs: every command that writes one takes it as OUT (where that reads naturally) or --out ----


def add_output(parser: argparse.ArgumentParser, help: str, *, required: bool = True, first: bool = False) -> None:
    """OUT as a positional and as --out, the same value either way (resolve_output checks them after parsing).

    first: OUT is the first positional, before a list of inputs (`adapter combine OUT A B`); given as
    --out, every positional is then an input."""
    parser.add_argument("out", nargs="?", default=None, metavar="OUT", help=f"{help} (or --out OUT)")
    parser.add_argument("--out", dest="out_option", default=None, metavar="OUT", help="the same as OUT")
    parser.set_defaults(output_required=required, output_first=first)


def resolve_output(args: argparse.Namespace, inputs: str | None = None) -> str | None:
    """args.out from OUT or --out; the error message when they disagree or a required one is missing.

    inputs: for output_first commands, the name of the positional list that OUT moves into under --out."""
    if not hasattr(args, "out_option"):
        return None
    if args.out_option is not None:
        if getattr(args, "output_first", False) and args.out is not None:
            name = inputs or "inputs"
            setattr(args, name, [args.out, *getattr(args, name)])
        elif args.out is not None and args.out != args.out_option:
            return f"OUT given twice, as {args.out!r} and --out {args.out_option!r}; give one"
        args.out = args.out_option
    if args.out is None and args.output_required:
        return "the output is missing: give OUT as an argument or --out OUT"
    return None


def task_spelling(text: str) -> str:
    """A task as `--task(s)` spells it: a built-in name, reasoning_gym:NAME[@config.yaml], jsonl:PATH[@verifier.py:FN]
    or mix:spec.yaml (qwenlab.tasks.registry); a bad one is refused at parsing with the task's own message."""
    from qwenlab.errors import QwenlabError
    from qwenlab.tasks import get_task

    try:
        get_task(text)
    except QwenlabError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def one_of(*values: str):
    """An argparse type accepting exactly these words (loss types, selection rules)."""
    def parse(text: str) -> str:
        if text not in values:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(values)}, got {text!r}")
        return text
    return parse
