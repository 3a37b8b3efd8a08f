"""`qwenlab eval` through the entry point: table and JSON outputs, unknown task error."""

import json

from qwenlab.cli import main


def test_eval_json_reports_accuracy_per_task(tiny_model_dir, capsys):
    assert main(["eval", str(tiny_model_dir), "--tasks", "arithmetic,count_letter", "--n", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["tasks"]) == {"arithmetic", "count_letter"}
    assert all(t["n"] == 3 and 0 <= t["accuracy"] <= 1 for t in data["tasks"].values())


def test_eval_table_and_unknown_task(tiny_model_dir, capsys):
    assert main(["eval", str(tiny_model_dir), "--tasks", "reverse", "--n", "2"]) == 0
    assert "| reverse | 2 |" in capsys.readouterr().out
    assert main(["eval", str(tiny_model_dir), "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
