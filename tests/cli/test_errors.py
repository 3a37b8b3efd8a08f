"""How `qwenlab` ends: a user error is one line and exit 2, a bug its traceback, a report request and exit 1."""

import pytest

from qwenlab import __version__
from qwenlab.cli import main


def test_a_user_error_is_one_line_without_a_traceback(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nope'}: no such model folder\n"


@pytest.mark.parametrize("argv", [["--debug", "info", "{nope}"], ["info", "{nope}", "--debug"]])
def test_debug_shows_the_trace_of_a_user_error(tmp_path, capsys, argv):
    assert main([a.format(nope=tmp_path / "nope") for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "QwenlabError" in err
    assert err.endswith(f"error: {tmp_path / 'nope'}: no such model folder\n")


def test_an_os_error_naming_a_file_is_a_user_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["data", "sft", str(blocker / "sub" / "d.jsonl"), "--task", "reverse", "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {blocker}") and "Traceback" not in err


def test_a_bug_shows_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    import qwenlab.cli.model as commands

    def broken(args):
        return {}["a library bug"]

    monkeypatch.setattr(commands, "cmd_nano", broken)
    assert main(["nano", "path"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "KeyError: 'a library bug'" in err
    assert err.endswith(f"qwenlab {__version__} hit a bug; please report it with the command and this trace\n")


def test_an_os_error_without_a_file_is_a_bug(monkeypatch, capsys):
    import qwenlab.cli.model as commands

    def broken(args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(commands, "cmd_nano", broken)
    assert main(["nano", "path"]) == 1
    assert "hit a bug" in capsys.readouterr().err


def test_a_bad_flag_value_is_refused_by_argparse_with_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "nano", "--prompt", "x", "--top-p", "nan"])
    assert stop.value.code == 2
    assert "argument --top-p: expected a finite number, got 'nan'" in capsys.readouterr().err



def test_a_reader_that_leaves_early_gets_no_broken_pipe_traceback(tiny_model_dir):
    """`qwenlab generate ... | head -c 1`: the writer finds the pipe closed; it ends quietly, no traceback."""
    import subprocess
    import sys

    # stdout is a pipe closed after the first byte; generate streams 200 more tokens into it, a flush each
    child = subprocess.Popen([sys.executable, "-m", "qwenlab", "generate", str(tiny_model_dir), "hello",
                              "--max-new-tokens", "200", "--temperature", "1", "--seed", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout.read(1)
    child.stdout.close()
    err = child.stderr.read().decode()
    assert child.wait(120) != 0  # it did find the pipe closed (a run that ended before would exit 0)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
