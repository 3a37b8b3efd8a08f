"""The recipe's `swarm` stage on a tiny model: one peer, two rounds (the stage's plumbing, not learning)."""

from __future__ import annotations

from qwenlab.recipe.context import RunContext
from qwenlab.recipe.stages import run_stage


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
