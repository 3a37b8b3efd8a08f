"""Outputs are named the same way in every command that writes one: OUT as an argument, or --out OUT."""

import json

import pytest

from qwenlab.cli import main

# (argv before the output, what the output is); each writes something small from nano.
WRITERS = [
    (["data", "sft", "--task", "arithmetic", "--n", "3"], "file"),
    (["quantize", "nano", "--bits", "8"], "folder"),
    (["export", "gguf", "nano", "--type", "q8_0"], "file"),
]


@pytest.mark.parametrize("argv,kind", WRITERS, ids=lambda v: v[0] if isinstance(v, list) else v)
def test_out_as_argument_and_as_option_write_the_same(tmp_path, argv, kind):
    positional, option = tmp_path / "positional", tmp_path / "option"
    assert main([*argv, str(positional)]) == 0
    assert main([*argv, "--out", str(option)]) == 0
    assert positional.exists() and option.exists()
    if kind == "file":
        assert positional.stat().st_size == option.stat().st_size > 0
    else:
        assert sorted(p.name for p in positional.iterdir()) == sorted(p.name for p in option.iterdir())


def test_out_given_twice_or_not_at_all_is_one_line_error(tmp_path, capsys):
    assert main(["quantize", "nano", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: OUT given twice, as '{tmp_path / 'a'}' and --out "
                                               f"'{tmp_path / 'b'}'; give one")
    assert main(["quantize", "nano"]) == 2
    assert "give OUT as an argument or --out OUT" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_out_option_in_a_command_whose_out_comes_first(tmp_path):
    """`adapter combine OUT A B` and `adapter combine --out OUT A B` are the same command."""
    from tests.bench.conftest import write_lora
    from qwenlab.nano import nano_path

    a, b = write_lora(nano_path(), tmp_path / "a", seed=0), write_lora(nano_path(), tmp_path / "b", seed=1)
    assert main(["adapter", "combine", str(tmp_path / "first"), str(a), str(b)]) == 0
    assert main(["adapter", "combine", "--out", str(tmp_path / "option"), str(a), str(b)]) == 0
    first = json.loads((tmp_path / "first" / "adapter_config.json").read_text())
    option = json.loads((tmp_path / "option" / "adapter_config.json").read_text())
    assert first["r"] == option["r"] == 4


def test_every_writing_command_documents_both_spellings(capsys):
    for argv in (["quantize"], ["export", "gguf"], ["random"], ["merge"], ["data", "sft"], ["adapter", "merge"],
                 ["adapter", "extract"], ["adapter", "combine"], ["train", "sft"], ["grpo"], ["compare"]):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        assert "--out OUT" in capsys.readouterr().out, argv
