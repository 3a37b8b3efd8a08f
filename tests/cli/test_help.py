"""Every --help shows each option's default (argparse prints nothing for options without help text)."""

import argparse

from qwenlab.cli import _subparsers, build_parser


def all_parsers(parser):
    yield parser
    for sub in _subparsers(parser):
        yield from all_parsers(sub)


def test_every_option_with_a_default_shows_it_in_help():
    missing = []
    for parser in all_parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS, []):
                continue
            shown = f"(default: {action.default})" in text or "default" in (action.help or "").lower()
            if not shown:
                missing.append(f"{parser.prog} {action.option_strings[0]}")
    assert not missing, missing
    assert "(default: 128)" in build_parser()._subparsers._group_actions[0].choices["generate"].format_help()


def test_train_sft_lists_only_the_options_that_apply_and_shows_the_config_defaults():
    kinds = build_parser()._subparsers._group_actions[0].choices["train"]._subparsers._group_actions[0].choices
    sft, dpo = kinds["sft"].format_help(), kinds["dpo"].format_help()
    assert "--beta" not in sft and "--dpo-loss" not in sft
    assert "--beta" in dpo and "--dpo-loss" in dpo
    assert "LoRA rank r (default: 16)" in " ".join(sft.split())


def test_task_names_are_listed_where_tasks_are_taken():
    from qwenlab.tasks import TASKS

    choices = build_parser()._subparsers._group_actions[0].choices
    data_sft = choices["data"]._subparsers._group_actions[0].choices["sft"]
    for parser in (choices["eval"], choices["grpo"], choices["merge-search"], data_sft):
        text = " ".join(parser.format_help().split())
        assert all(name in text for name in TASKS), parser.prog


def test_a_command_imports_only_its_own_module_so_bad_input_is_reported_fast(tmp_path):
    """`train sft` with a missing data file fails before torch is imported (grpo's flag table would import it)."""
    import subprocess
    import sys

    code = ("import sys; from qwenlab.cli import main; "
            f"rc = main(['train', 'sft', '--data', {str(tmp_path / 'missing.jsonl')!r}, '--out', {str(tmp_path / 'o')!r}]); "
            "print(rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "missing.jsonl: data file not found" in done.stderr


def test_every_verb_is_mapped_to_the_module_that_registers_it():
    from qwenlab.cli import VERBS, modules_for

    full = set(build_parser()._subparsers._group_actions[0].choices)
    assert full == {verb for verbs in VERBS.values() for verb in verbs}
    for module, verbs in VERBS.items():
        for verb in verbs:
            parser = build_parser([verb])
            assert verb in parser._subparsers._group_actions[0].choices
            assert module in modules_for([verb])
    assert "grpo" in build_parser(["train", "grpo"])._subparsers._group_actions[0].choices["train"] \
        ._subparsers._group_actions[0].choices
