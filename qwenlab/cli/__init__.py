"""The `qwenlab` command: argparse over the library. Each capability registers its verbs in one file.

User errors (QwenlabError, missing files) print one line to stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qwenlab import __version__
from qwenlab.errors import QwenlabError

# One line per capability: a module with `register(subparsers)`.
COMMAND_MODULES = [
    "qwenlab.cli.model_commands",
    "qwenlab.cli.eval_commands",
    "qwenlab.cli.recipe_commands",
    "qwenlab.cli.merge_commands",
    "qwenlab.cli.adapter_commands",
    "qwenlab.cli.train_commands",
    "qwenlab.cli.serve_commands",
    "qwenlab.cli.grpo_commands",  # after train_commands: adds `train grpo`
    "qwenlab.cli.swarm_commands",
    "qwenlab.cli.measure_commands",  # ls, compare, card, merge-search
    "qwenlab.cli.quant_commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenlab", description="A CPU-first lab for Qwen2.5 small models.")
    parser.add_argument("--version", action="version", version=f"qwenlab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
        return int(result or 0)
    except QwenlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
