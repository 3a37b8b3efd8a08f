"""The `qwenlab` command: argparse over the library. Each capability registers its verbs in one file.

Exit codes: 0 done; 2 a user error (bad flag, file or field), printed as one `error: ...` line on
stderr that names the culprit; 1 a bug, printed with its traceback and a request to report it;
130 interrupted. `--debug` prints the traceback of user errors too.

User errors are QwenlabError, raised where the library reads its inputs, and OSErrors that name
a file (a missing path, a folder where a file belongs, no permission, a full disk). Anything else
is a bug: it is never turned into a one-line message here, so it cannot be mistaken for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from qwenlab import __version__
from qwenlab.errors import QwenlabError

# One line per capability: a module with `register(subparsers)`.
COMMAND_MODULES = [
    "qwenlab.cli.model",  # info, generate, chat, random, nano
    "qwenlab.cli.eval",
    "qwenlab.cli.run",
    "qwenlab.cli.merge",  # merge, merge-search
    "qwenlab.cli.adapter",
    "qwenlab.cli.train",  # train sft|dpo, data
    "qwenlab.cli.serve",
    "qwenlab.cli.grpo",  # after train: adds `train grpo`
    "qwenlab.cli.swarm",
    "qwenlab.cli.variants",  # ls
    "qwenlab.cli.report",  # compare, card
    "qwenlab.cli.quant",  # quantize, export gguf
    "qwenlab.cli.bench",
    "qwenlab.cli.hub",  # pull, cache clear
]

USER_ERROR = 2  # argparse's own code for a bad command line, so every user error exits alike
BUG = 1
INTERRUPTED = 130
BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports it

DEBUG_HELP = "on an error, print the full traceback"


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:  # argparse keeps sub-commands in _SubParsersAction
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.values()


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every --help shows each option's default, unless its help already names it."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS, []) \
                or action.option_strings == [] or isinstance(action, argparse._HelpAction):
            return text
        return f"{text} (default: %(default)s)"


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _DefaultsHelpFormatter
    for action in parser._actions:  # argparse prints nothing for an option without help text
        if action.help is None and action.option_strings:
            action.help = ""
            if action.default not in (None, False, argparse.SUPPRESS, []):
                action.help = "(default: %(default)s)"
    for sub in _subparsers(parser):
        _show_defaults(sub)


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """`--debug` on every verb as well, so it works after the verb too (`qwenlab merge c.yaml out --debug`).

    SUPPRESS as default: a verb's parser must not reset a `--debug` given before the verb.
    """
    for sub in _subparsers(parser):
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        _add_debug_flag(sub)


# The top-level verbs each module registers: a command imports only its own module, so a bad flag
# or a missing file is reported before another module's imports (grpo's flag table imports torch).
VERBS = {
    "qwenlab.cli.model": ("info", "generate", "chat", "random", "nano"), "qwenlab.cli.eval": ("eval",),
    "qwenlab.cli.run": ("run",), "qwenlab.cli.merge": ("merge", "merge-search"), "qwenlab.cli.adapter": ("adapter",),
    "qwenlab.cli.train": ("train", "data"), "qwenlab.cli.serve": ("serve",), "qwenlab.cli.grpo": ("grpo",),
    "qwenlab.cli.swarm": ("swarm",), "qwenlab.cli.variants": ("ls",), "qwenlab.cli.report": ("compare", "card"),
    "qwenlab.cli.quant": ("quantize", "export"), "qwenlab.cli.bench": ("bench",), "qwenlab.cli.hub": ("pull", "cache"),
}


def modules_for(argv: list[str] | None) -> list[str]:
    """The command modules `argv` needs (all of them for top-level help or an unknown verb)."""
    words = [a for a in (argv or []) if not a.startswith("-")]
    if not words:
        return COMMAND_MODULES
    needed = [m for m in COMMAND_MODULES if words[0] in VERBS.get(m, ())]
    if words[0] == "train" and words[1:2] == ["grpo"]:
        needed.append("qwenlab.cli.grpo")  # it adds `train grpo`
    return needed or COMMAND_MODULES


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given argv, only the modules its verb needs are imported (see VERBS)."""
    parser = argparse.ArgumentParser(prog="qwenlab", description="A CPU-first lab for Qwen2.5 small models.")
    parser.add_argument("--version", action="version", version=f"qwenlab {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (COMMAND_MODULES if argv is None else modules_for(argv)):
        importlib.import_module(name).register(subparsers)
    _add_debug_flag(parser)
    _show_defaults(parser)
    return parser


def user_error_message(error: BaseException) -> str | None:
    """The one line for a user error, or None when `error` is a bug."""
    if isinstance(error, QwenlabError):
        return str(error)
    if isinstance(error, OSError) and error.filename is not None:
        # The OS names the path; its errno text says what was wrong with it.
        what = error.strerror or type(error).__name__
        path = error.filename if error.filename2 is None else f"{error.filename} -> {error.filename2}"
        return f"{path}: {what}"
    return None


def report_bug() -> None:
    traceback.print_exc()
    print(f"qwenlab {__version__} hit a bug; please report it with the command and this trace", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args, extras = parser.parse_known_args(argv)
    # argparse fills an optional positional OUT before the options that follow the inputs, so in
    # `quantize nano --bits 8 OUT` the OUT is left over: it is OUT, when the command takes one.
    if len(extras) == 1 and not extras[0].startswith("-") and hasattr(args, "out_option") and args.out is None:
        args.out, extras = extras[0], []
    if extras:
        parser.parse_args(argv)  # argparse's own message for what is left over (exit 2)
    if not getattr(args, "func", None):
        parser.print_help()
        return USER_ERROR
    from qwenlab.cli.types import resolve_output

    problem = resolve_output(args, inputs="adapters")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return USER_ERROR
    debug = args.debug or os.environ.get("QWENLAB_DEBUG") == "1"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # `qwenlab ... | head`: the reader left; nothing to report
        sys.stdout = open(os.devnull, "w")  # else the interpreter's final flush fails again
        return BROKEN_PIPE
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            report_bug()
            return BUG
        if debug:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
