"""The recipe's `swarm` stage on a tiny model: one peer, one round (the stage's plumbing, not learning)."""

from __future__ import annotations

from qwenlab.recipe.context import RunContext
from qwenlab.recipe.stages import STAGES


def test_swarm_stage_registers_the_adapter_and_reports(tiny_model_dir, tmp_path):
    ctx = RunContext(run_dir=tmp_path, models={"base": str(tiny_model_dir)})
    figures, section = STAGES["swarm"](ctx, {"base": "base", "task": "arithmetic", "peers": 1, "rounds": 1,
                                             "num_generations": 2, "local": 1, "eval_n": 4, "as": "swarm-arith"})
    assert figures["exit_codes"] == [0] and len(figures["reward_last_round"]) == 1
    assert 0 <= figures["accuracy_after"] <= 1
    assert (tmp_path / "models" / "swarm-arith" / "adapter_model.safetensors").is_file()
    assert ctx.model_path("swarm-arith").endswith("swarm-arith")
    assert (tmp_path / "swarm" / "swarm-arith" / "rewards.png").is_file()
    assert "![reward per round](swarm/swarm-arith/rewards.png)" in section
