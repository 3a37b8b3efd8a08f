"""The GRPO learner and loop on a tiny model: it learns from rewards, checkpoints, resumes, and has a CLI."""

from __future__ import annotations

import json

import pytest
import torch

from qwenlab.adapters import active_adapters, read_adapter
from qwenlab.native import available as kernels_available
from qwenlab.quant import native
from qwenlab.train.grpo import GRPOConfig, GRPOLearner, Rollout, run_grpo
from qwenlab.train.grpo.policy import POLICY
from tests.conftest import build_hf_model


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory):
    """A tiny model saved in bf16, like nano: training must still run in fp32 on the CPU."""
    folder = tmp_path_factory.mktemp("grpo") / "bf16"
    build_hf_model(folder, dtype=torch.bfloat16, seed=5)
    return folder


def completion_logprob(learner: GRPOLearner, prompt: str, text: str) -> float:
    prompt_ids = learner._prompt_ids(prompt)
    ids = learner.tokenizer.encode(text) + [learner.end_id]
    tokens = torch.tensor([prompt_ids + ids])
    with torch.no_grad(), active_adapters(learner.model, POLICY):
        logp = torch.log_softmax(learner.model(tokens)[0, :-1].float(), -1)
    targets = tokens[0, 1:]
    return float(logp[len(prompt_ids) - 1:, :].gather(1, targets[len(prompt_ids) - 1:, None]).sum())


def test_learner_moves_probability_towards_the_rewarded_completion(tiny_model_dir):
    torch.manual_seed(0)
    learner = GRPOLearner.create(GRPOConfig(model=str(tiny_model_dir), learning_rate=3e-2))
    assert learner.model.dtype == torch.float32
    prompt = "What is 2 + 3?"
    rollout = Rollout("arithmetic", 100_000_001, 1, prompt, ["5", "7", "5", "7"], [1.0, 0.0, 1.0, 0.0],
                      ["stop"] * 4)
    good, bad = completion_logprob(learner, prompt, "5"), completion_logprob(learner, prompt, "7")
    for _ in range(8):
        stats = learner.train_step([rollout])
    assert stats["rows_trained"] == 4 and stats["grad_norm"] > 0
    good_after, bad_after = completion_logprob(learner, prompt, "5"), completion_logprob(learner, prompt, "7")
    assert good_after > good and bad_after < bad
    assert (good_after - bad_after) - (good - bad) > 0.3


def test_groups_without_reward_signal_skip_the_forward_pass(tiny_model_dir):
    learner = GRPOLearner.create(GRPOConfig(model=str(tiny_model_dir)))
    flat = Rollout("arithmetic", 100_000_002, 1, "What is 1 + 1?", ["2", "3"], [0.0, 0.0], ["stop", "length"])
    stats = learner.train_step([flat])
    assert stats["rows_trained"] == 0 and stats["loss"] == 0.0 and stats["tokens"] > 0


def test_kl_beta_uses_the_base_model_as_reference(tiny_model_dir):
    learner = GRPOLearner.create(GRPOConfig(model=str(tiny_model_dir), beta=0.5, learning_rate=5e-2))
    rollout = Rollout("arithmetic", 100_000_003, 1, "What is 4 + 4?", ["8", "9"], [1.0, 0.0], ["stop", "stop"])
    first = learner.train_step([rollout])
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0: the policy is the base model
    second = learner.train_step([rollout])
    assert second["kl"] > 0


def test_run_checkpoints_and_resumes(bf16_model_dir, tmp_path):
    out = tmp_path / "run"
    config = GRPOConfig(model=str(bf16_model_dir), steps=3, batch=2, num_generations=3, max_new_tokens=6,
                        save_every=2)
    first = run_grpo(config, out, progress=False)
    assert first["steps"] == 3
    rows = [json.loads(line) for line in (out / "rewards.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (out / "rewards.png").is_file() and (out / "checkpoint" / "trainer_state.pt").is_file()
    adapter = read_adapter(out / "adapter")
    assert adapter.alpha == 16.0 and adapter.ranks() == {8}
    assert json.loads((out / "adapter" / "lineage.json").read_text())["method"] == "grpo"

    config.steps = 5
    second = run_grpo(config, out, progress=False)
    rows = [json.loads(line) for line in (out / "rewards.jsonl").read_text().splitlines()]
    assert second["steps"] == 5 and [r["step"] for r in rows] == [1, 2, 3, 4, 5]

    fresh = run_grpo(GRPOConfig(model=str(bf16_model_dir), steps=1, batch=1, num_generations=2, max_new_tokens=4),
                     out, resume=False, progress=False)
    assert fresh["steps"] == 1


def test_cli_train_grpo(bf16_model_dir, tmp_path, capsys):
    from qwenlab.cli import main

    out = tmp_path / "cli"
    code = main(["train", "grpo", "--model", str(bf16_model_dir), "--out", str(out), "--steps", "1", "--batch", "1",
                 "--num-generations", "2", "--max-new-tokens", "4", "--tasks", "arithmetic,reverse"])
    assert code == 0
    assert "1 steps" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["grpo", "--model", str(bf16_model_dir), "--out", str(out), "--num-generations", "1"]) == 2


def test_merged_generation_samples_the_same_policy_and_restores_the_weights(tiny_model_dir):
    from qwenlab.adapters.apply import lora_modules
    from qwenlab.train.grpo import draw_instances

    learner = GRPOLearner.create(GRPOConfig(model=str(tiny_model_dir), num_generations=3, max_new_tokens=6))
    with torch.no_grad():
        for module in lora_modules(learner.model).values():
            module.lora_B[POLICY].normal_(0, 0.5)  # a policy that differs from the base
    before = {n: p.clone() for n, p in learner.model.state_dict().items() if "lora" not in n}
    wrappers = set(lora_modules(learner.model))
    instances = draw_instances(["reverse"], 2, "merge")
    stack_steps = []
    stack_call = native.DecodeStack.__call__

    def counting(self, *args, **kwargs):  # counts the decode steps the native stack ran (it returns None otherwise)
        out = stack_call(self, *args, **kwargs)
        stack_steps.append(out is not None and not self.has_adapters)
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native.DecodeStack, "__call__", counting)
        merged = learner.rollouts(instances, seed=7)
    if kernels_available():  # the merged policy's decode steps ran as one native call each, on plain weights
        assert stack_steps and all(stack_steps)
    assert set(lora_modules(learner.model)) == wrappers  # the adapter wrappers are back
    after = learner.model.state_dict()
    assert all(torch.allclose(before[n], after[n], atol=1e-6) for n in before)
    learner.config.merge_for_generation = False
    unmerged = learner.rollouts(instances, seed=7)
    assert [r.completion_ids for r in merged] == [r.completion_ids for r in unmerged]
    tokens = torch.tensor([learner._prompt_ids(instances[0].prompt)])
    with torch.no_grad(), active_adapters(learner.model, POLICY):
        policy_logits = learner.model(tokens)
    with torch.no_grad(), active_adapters(learner.model, None):
        base_logits = learner.model(tokens)
    assert (policy_logits - base_logits).abs().max() > 0.1  # so the equality above is not trivial


def test_bf16_rollouts_add_the_policy_per_row_on_the_native_stack_and_leave_the_base_alone(tiny_model_dir):
    """Over a bf16 base the policy is never merged (bf16 rounding would change the base each step): a decode step
    on the native stack adds each row's LoRA delta (PolicyRows); its logits equal the layer-by-layer LoRA path's."""
    from qwenlab.adapters.apply import lora_modules
    from qwenlab.train.grpo import draw_instances
    from qwenlab.train.grpo.policy_rows import policy_rows

    learner = GRPOLearner.create(GRPOConfig(model=str(tiny_model_dir), num_generations=3, max_new_tokens=6,
                                            dtype="bf16"))
    model = learner.model
    assert model.head_weight.dtype == torch.bfloat16
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B[POLICY].normal_(0, 0.5)
    before = {n: p.clone() for n, p in model.state_dict().items() if "lora" not in n}
    rollouts = learner.rollouts(draw_instances(["reverse"], 2, "bf16"), seed=3)
    assert all(len(r.completions) == 3 for r in rollouts)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items() if n in before)  # bit for bit

    prompt = torch.tensor([learner._prompt_ids("Reverse the word: planet")] * 2)

    def next_logits(mode: str) -> torch.Tensor:
        """The logits of the first decode step after the prompt: "native" (PolicyRows on the decode stack),
        "layered" (LoRALinear's own forward, layer by layer) or "base" (no adapter)."""
        cache = model.new_cache(2, prompt.shape[1] + 2)
        with torch.no_grad(), active_adapters(model, None if mode == "base" else POLICY):
            first = model(prompt, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            if mode != "native":
                return model(first, cache=cache)[:, -1]
            with policy_rows(model, POLICY, 2):
                return model(first, cache=cache)[:, -1]

    steps = []
    stack_call = native.DecodeStack.__call__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native.DecodeStack, "__call__",
                      lambda self, *a, **k: steps.append(1) or stack_call(self, *a, **k))
        per_row = next_logits("native")
    layered, base = next_logits("layered"), next_logits("base")
    if kernels_available():
        assert steps  # the step ran on the native stack
    effect = (layered - base).abs().max().item()
    assert effect > 0.1 and (per_row - layered).abs().max().item() < 0.05 * effect


def test_activation_checkpointing_gives_the_same_step_and_auto_follows_the_budget(tiny_model_dir, monkeypatch):
    """Recomputing each layer in the backward changes memory, not the gradient: one step from the same state gives
    the same policy either way. auto turns it on only when a micro-batch would keep more than the budget."""
    rollout = Rollout("arithmetic", 100_000_003, 1, "What is 4 + 4?", ["8", "9", "8 or 9", "16"],
                      [1.0, 0.0, 0.5, 0.0], ["stop"] * 4)
    policies, recomputed = [], []
    for choice in ("off", "on"):
        learner = GRPOLearner.create(GRPOConfig(model=str(tiny_model_dir), learning_rate=1e-2,
                                                activation_checkpointing=choice))
        checkpoint = torch.utils.checkpoint.checkpoint
        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                            lambda *a, **k: recomputed.append(choice) or checkpoint(*a, **k))
        learner.train_step([rollout])
        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)
        policies.append(learner.adapter().modules)
    assert set(recomputed) == {"on"}
    off, on = policies
    assert all(torch.allclose(off[n][i], on[n][i], atol=1e-6) for n in off for i in (0, 1))
    assert any((off[n][1] != 0).any() for n in off)  # the step moved the policy
    tokens = torch.zeros(2, 50, dtype=torch.long)
    learner.config.activation_checkpointing = "auto"
    assert not learner._checkpoint_layers(tokens)  # a tiny model's activations are far under the budget
    from qwenlab.train import activations

    monkeypatch.setattr(activations, "ACTIVATION_BUDGET_BYTES", 1)
    assert learner._checkpoint_layers(tokens)
