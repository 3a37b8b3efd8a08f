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


def test_train_stage_stops_early_on_a_held_out_mix_and_needs_eval_steps(tiny_model_dir, tmp_path):
    import json

    ctx = RunContext(run_dir=tmp_path, models={"base": str(tiny_model_dir)})
    figures, _ = run_stage("train", ctx, {"kind": "sft", "base": "base", "task": "arithmetic", "n": 40, "steps": 40,
                                          "as": "a", "batch_size": 4, "lora_r": 2, "threads": 1, "engine": "native",
                                          "learning_rate": 3e-2, "lora_dropout": 0.0, "val_fraction": 0.25,
                                          "replay": 0.5, "replay_answers": "reference",
                                          "replay_tasks": ["reverse", "sort_letters"],
                                          "early_stopping": 2, "eval_steps": 1})
    log = json.loads((tmp_path / "models" / "a" / "training_log.json").read_text())
    assert log["config"]["early_stopping"] == 2 and log["config"]["save_steps"] == 1
    assert log["summary"]["eval_records"] == 20  # 10 held-out arithmetic examples and their share of replay
    evals = [e["eval_loss"] for e in log["log_history"] if "eval_loss" in e]
    assert figures["steps"] == len(evals) and log["summary"]["eval_loss"] == pytest.approx(min(evals))
    # at this learning rate the mixed eval loss turns up within a few steps: it stopped two evaluations after its best
    assert figures["steps"] < 40 and evals.index(min(evals)) == len(evals) - 3, evals
    with pytest.raises(QwenlabError, match="early_stopping needs eval_steps"):
        run_stage("train", ctx, {"kind": "sft", "task": "reverse", "as": "x", "early_stopping": 2})
