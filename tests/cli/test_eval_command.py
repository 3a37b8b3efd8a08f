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


def test_eval_stacks_several_adapters_and_does_not_record_them(tmp_path, capsys):
    """Two adapters are merged in order; their figures are recorded nowhere (no one folder is that variant)."""
    import torch

    from qwenlab.adapters import LoraAdapter, write_adapter
    from qwenlab.checkpoint import open_checkpoint
    from qwenlab.cli import main
    from qwenlab.checkpoint.reader import resolve_model_path

    config = open_checkpoint("nano").config
    folders = []
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        module = "model.layers.0.self_attn.q_proj"
        a = torch.randn(2, config.hidden_size, generator=generator) * 0.5
        b = torch.randn(config.hidden_size, 2, generator=generator) * 0.5
        folders.append(write_adapter(LoraAdapter({module: (a, b)}, alpha=4.0, base_model=str(resolve_model_path("nano"))),
                                     tmp_path / f"lora{seed}"))
    args = ["eval", "nano", "--tasks", "reverse", "--n", "4", "--json"]
    assert main([*args, "--adapter", str(folders[0]), "--adapter", str(folders[1])]) == 0
    captured = capsys.readouterr()
    assert "not recorded" in captured.err and '"reverse"' in captured.out
    assert not (folders[0] / "measurements.jsonl").exists() and not (folders[1] / "measurements.jsonl").exists()
