"""The recipe stages `train` and `adapter_eval` on a tiny model (a smoke test: two steps, four instances)."""

from __future__ import annotations

import pytest

from qwenlab.errors import QwenlabError
from qwenlab.recipe.context import RunContext
from qwenlab.recipe.stages import run_stage


def test_train_then_adapter_eval(tiny_model_dir, tmp_path):
    ctx = RunContext(run_dir=tmp_path, models={"base": str(tiny_model_dir)})
    figures, section = run_stage("train", ctx, {"kind": "dpo", "base": "base", "task": "reverse", "n": 8, "steps": 2,
                                             "as": "rev", "batch_size": 4, "lora_r": 2, "threads": 1})
    assert figures["steps"] == 2 and figures["kind"] == "dpo"
    assert (tmp_path / "models" / "rev" / "adapter_config.json").is_file()
    assert "models/rev/loss_curve.png" in section and ctx.model_path("rev") == str(tmp_path / "models" / "rev")
    figures, section = run_stage("adapter_eval", ctx, {"base": "base", "adapters": ["rev"], "tasks": ["reverse"], "n": 4})
    assert set(figures) == {"base", "rev"} and set(figures["rev"]) == {"reverse"}
    assert "| rev |" in section and ("(+" in section or "(-" in section)


def test_train_stage_checks_its_parameters(tmp_path):
    ctx = RunContext(run_dir=tmp_path)
    with pytest.raises(QwenlabError, match="train stage.kind: Input should be 'sft' or 'dpo', got 'ppo'"):
        run_stage("train", ctx, {"kind": "ppo", "task": "reverse", "as": "x"})
    with pytest.raises(QwenlabError, match="train stage.as: Field required"):
        run_stage("train", ctx, {"kind": "sft", "task": "reverse"})


def test_train_stage_runs_the_native_engine_in_bf16(tiny_model_dir, tmp_path):
    import json

    ctx = RunContext(run_dir=tmp_path, models={"base": str(tiny_model_dir)})
    figures, _ = run_stage("train", ctx, {"kind": "sft", "base": "base", "task": "reverse", "n": 8, "steps": 2,
                                          "as": "rev", "batch_size": 4, "lora_r": 2, "threads": 1,
                                          "engine": "native", "dtype": "bf16"})
    assert figures["steps"] == 2
    log = json.loads((tmp_path / "models" / "rev" / "training_log.json").read_text())
    assert log["config"]["engine"] == "native" and log["config"]["dtype"] == "bf16"
    with pytest.raises(QwenlabError, match="train stage.engine: Input should be 'trl' or 'native'"):
        run_stage("train", ctx, {"kind": "sft", "task": "reverse", "as": "x", "engine": "fast"})
