"""The recipe's `swarm` stage on a tiny model: one peer, two rounds (the stage's plumbing, not learning)."""

from __future__ import annotations

import json

import pytest

from qwenlab.errors import QwenlabError
from qwenlab.recipe.context import RunContext
from qwenlab.recipe.stages import run_stage
from qwenlab.recipe.stages.params import validate_params
from qwenlab.recipe.stages.swarm import Params


def test_swarm_stage_picks_a_snapshot_on_validation_registers_it_and_reports(tiny_model_dir, tmp_path):
    ctx = RunContext(run_dir=tmp_path, models={"base": str(tiny_model_dir)})
    figures, section = run_stage("swarm", ctx, {"base": "base", "task": "arithmetic", "peers": 1, "rounds": 2,
                                             "num_generations": 2, "local": 1, "eval_n": 4, "select_every": 1,
                                             "as": "swarm-arith"})
    assert figures["exit_codes"] == [0] and len(figures["reward_last_round"]) == 1
    assert 0 <= figures["accuracy_after"] <= 1
    # a fresh LoRA is the base itself, so the candidates are the peer's snapshots at rounds 1 and 2
    assert [r for r, _ in figures["validation"]["0"]] == [1, 2]
    chosen = figures["chosen"]
    assert chosen["peer"] == 0 and chosen["round"] in (1, 2)
    assert chosen["validation_accuracy"] == max(a for _, a in figures["validation"]["0"])
    registered = tmp_path / "models" / "swarm-arith"
    snapshot = tmp_path / "swarm" / "swarm-arith" / "peer0" / "snapshots" / f"round-{chosen['round']:06d}"
    assert (registered / "adapter_model.safetensors").read_bytes() == \
        (snapshot / "adapter_model.safetensors").read_bytes()
    assert (registered / "tokenizer_config.json").is_file()  # completed from the peer's final adapter folder
    assert ctx.model_path("swarm-arith").endswith("swarm-arith")
    assert (tmp_path / "swarm" / "swarm-arith" / "rewards.png").is_file()
    assert "![reward per round and validation accuracy](swarm/swarm-arith/rewards.png)" in section
    assert f"peer 0's adapter at round {chosen['round']}" in section


def test_swarm_stage_takes_tasks_in_any_spelling_and_reports_each(tiny_model_dir, tmp_path):
    (tmp_path / "chain_sum.yaml").write_text("min_terms: 2\nmax_terms: 2\nmax_digits: 1\n")
    chain_sum = f"reasoning_gym:chain_sum@{tmp_path / 'chain_sum.yaml'}"
    ctx = RunContext(run_dir=tmp_path / "run", models={"base": str(tiny_model_dir)})
    figures, section = run_stage("swarm", ctx, {"base": "base", "tasks": ["arithmetic", chain_sum], "peers": 1,
                                             "rounds": 2, "num_generations": 2, "local": 2, "eval_n": 2,
                                             "select_every": 0, "as": "swarm-mixed"})
    assert figures["exit_codes"] == [0] and figures["tasks"] == ["arithmetic", chain_sum]
    assert set(figures["accuracy_per_task"]["after"]) == {"arithmetic", chain_sum}
    rows = [json.loads(line) for line in
            (tmp_path / "run" / "swarm" / "swarm-mixed" / "peer0" / "rounds.jsonl").read_text().splitlines()]
    assert all(set(r["tasks"]) == {"arithmetic", chain_sum} for r in rows)  # one question of each task a round
    assert f"arithmetic, {chain_sum}" in section


@pytest.mark.parametrize("raw, message", [
    ({"task": "arithmetic", "tasks": ["reverse"]}, "give 'task' or 'tasks', not both"),
    ({"tasks": []}, "swarm.tasks: List should have at least 1 item"),
    ({"tasks": ["arithmetic", "reasoning_gym:chain_sun"]}, "swarm.tasks.1: Value error, reasoning_gym: unknown "
                                                             "dataset 'chain_sun'; did you mean chain_sum"),
    ({"tasks": ["reverse", "reverse"]}, "'tasks' names a task twice"),
])
def test_swarm_stage_task_fields_are_one_line_errors(raw, message):
    with pytest.raises(QwenlabError) as error:
        validate_params(Params, {"as": "x", **raw}, "swarm")
    assert message in str(error.value) and "\n" not in str(error.value)
