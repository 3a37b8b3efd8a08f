"""The swarm stage's solo control: one peer alone, same local rollouts, compared by a paired test."""

from qwenlab.recipe.context import RunContext
from qwenlab.recipe.stages import run_stage


def test_the_swarm_stage_runs_a_solo_control_and_says_whether_the_swarm_beat_it(tmp_path):
    """Two real peers on loopback, then one alone; both chosen on validation, both measured on the same test
    instances. The verdict follows the paired interval, and the solo peer never took outside rollouts."""
    ctx = RunContext(run_dir=tmp_path / "run")
    figures, section = run_stage("swarm", ctx, {
        "as": "swarm-a", "task": "arithmetic", "difficulty": 1, "peers": 2, "rounds": 2, "local": 2, "external": 2,
        "num_generations": 4, "eval_n": 30, "select_every": 1, "control": True, "timeout_s": 240})
    control = figures["control"]
    low, high = control["ci95"]
    assert low <= control["difference"] <= high
    assert abs(control["difference"] - (figures["accuracy_after"] - control["solo_accuracy"])) < 1e-3
    assert control["swarm_beat_solo"] == (low > 0 and control["p_value"] < 0.05)
    assert "Against solo GRPO" in section
    assert ("The swarm beat solo GRPO" in section) == control["swarm_beat_solo"]
    solo_rounds = (ctx.run_dir / "swarm" / "swarm-a-solo" / "peer0" / "rounds.jsonl").read_text().splitlines()
    assert len(solo_rounds) == 2 and all('"external_used": 0' in line for line in solo_rounds)
    assert (ctx.run_dir / "models" / "swarm-a" / "adapter_config.json").is_file()
