"""Our GRPO loss and its gradient equal TRL's GRPOTrainer._compute_loss on the same LoRA and batch."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")


def test_loss_and_lora_gradients_match_trl(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenlab.adapters import active_adapters
    from qwenlab.adapters.apply import lora_modules
    from qwenlab.train.grpo import GRPOConfig, GRPOLearner
    from qwenlab.train.grpo.loss import grpo_loss, pack_batch, token_logprobs
    from qwenlab.train.grpo.policy import POLICY

    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "down_proj"]
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, bf16=False, use_cpu=True, report_to="none",
                          gradient_checkpointing=False, beta=0.0, loss_type="dapo")
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), args=args,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        train_dataset=Dataset.from_list([{"prompt": "hi"}] * 4),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"))
    learner = GRPOLearner.create(GRPOConfig(model=str(tiny_model_dir), lora_rank=4, lora_alpha=8.0,
                                            lora_targets=targets))
    ours = lora_modules(learner.model)
    # the same non-zero adapter on both sides
    with torch.no_grad():
        for name, module in ours.items():
            theirs = trainer.model.get_submodule(f"base_model.model.{name}")
            theirs.lora_B["default"].weight.normal_(0, 0.3)
            module.lora_A[POLICY].copy_(theirs.lora_A["default"].weight)
            module.lora_B[POLICY].copy_(theirs.lora_B["default"].weight)

    prompt = [5, 17, 42, 9, 77]  # one prompt, a group of 4 completions of different lengths
    completions = [[3, 4, 5], [6], [7, 8, 9, 10], [11, 12]]
    advantages = torch.tensor([1.2, -0.4, 0.3, -1.1])
    width = max(map(len, completions))
    completion_ids = torch.tensor([c + [0] * (width - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    num_tokens = int(completion_mask.sum())
    inputs = {"prompt_ids": torch.tensor([prompt] * 4), "prompt_mask": torch.ones(4, len(prompt), dtype=torch.long),
              "completion_ids": completion_ids, "completion_mask": completion_mask, "advantages": advantages,
              "num_items_in_batch": torch.tensor(num_tokens)}
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()

    packed = pack_batch([prompt] * 4, completions, advantages, pad_id=0)
    with active_adapters(learner.model, POLICY):
        logprobs = token_logprobs(learner.model(packed.tokens), packed.tokens)
    our_loss, _ = grpo_loss(logprobs, packed.completion_mask, advantages, num_tokens=num_tokens)
    our_loss.backward()

    assert our_loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for name, module in ours.items():
        theirs = trainer.model.get_submodule(f"base_model.model.{name}")
        for ours_param, theirs_param in ((module.lora_A[POLICY], theirs.lora_A["default"].weight),
                                         (module.lora_B[POLICY], theirs.lora_B["default"].weight)):
            assert torch.allclose(ours_param.grad, theirs_param.grad, atol=1e-5, rtol=1e-4), name


# --- a whole step, from TRL's own generated and scored batch -----------------------------------------------

EOS = 293  # the tiny tokenizer's <|im_end|>: TRL's eos and ours


@pytest.fixture(scope="module")
def stopping_model_dir(tmp_path_factory):
    """A tiny untied model whose head makes <|im_end|> likely (p ~ 0.1 a token): in 6 new tokens some
    completions stop and some are cut, so masking truncated completions has something to do."""
    import json

    from tests.conftest import build_hf_model

    folder = tmp_path_factory.mktemp("stopping") / "model"
    model = build_hf_model(folder, tied=False)
    with torch.no_grad():
        hidden = model.model(torch.randint(0, 290, (16, 12))).last_hidden_state.reshape(-1, model.config.hidden_size)
        direction = hidden.mean(0)
        model.lm_head.weight[EOS] = 3.5 * direction / direction.norm() ** 2
    model.save_pretrained(folder)
    for name in ("config.json", "generation_config.json"):  # one end token, as qwenlab's learner uses
        config = json.loads((folder / name).read_text())
        config["eos_token_id"] = EOS
        (folder / name).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("loss_type, scale_rewards, mask_truncated", [
    ("grpo", "group", False), ("dr_grpo", "none", True), ("dapo", "batch", True), ("dapo", "group", False)])
def test_a_step_from_trls_generated_batch_matches(stopping_model_dir, tmp_path, loss_type, scale_rewards,
                                                 mask_truncated):
    """TRL generates and scores a batch (its advantages, its truncation mask); qwenlab's learner takes the
    same completions and rewards through train_step: the loss and every LoRA gradient agree."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenlab.adapters.apply import lora_modules
    from qwenlab.train.grpo import GRPOConfig, GRPOLearner, Rollout
    from qwenlab.train.grpo.policy import POLICY

    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "down_proj"]
    group, max_new = 4, 6
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=group,
                          max_completion_length=max_new, bf16=False, use_cpu=True, report_to="none",
                          gradient_checkpointing=False, beta=0.0, loss_type=loss_type, epsilon=0.2,
                          epsilon_high=0.28, scale_rewards=scale_rewards, mask_truncated_completions=mask_truncated)
    scored: list[float] = []

    def reward(completions, completion_ids, **kwargs):  # depends on the sampled tokens, so groups differ
        values = [float(sum(ids) % 5) / 4 for ids in completion_ids]
        scored.extend(values)
        return values

    prompts = ["What is 12 + 7?", "Reverse the word: apple"]
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(stopping_model_dir, dtype=torch.float32), args=args,
        reward_funcs=reward,
        train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts] * 4),
        processing_class=AutoTokenizer.from_pretrained(stopping_model_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"))
    learner = GRPOLearner.create(GRPOConfig(model=str(stopping_model_dir), lora_rank=4, lora_alpha=8.0,
                                            lora_targets=targets, num_generations=group, max_new_tokens=max_new,
                                            loss_type=loss_type, scale_rewards=scale_rewards,
                                            mask_truncated_completions=mask_truncated, max_grad_norm=1e9))
    ours = lora_modules(learner.model)
    with torch.no_grad():
        for name, module in ours.items():
            theirs = trainer.model.get_submodule(f"base_model.model.{name}")
            theirs.lora_B["default"].weight.normal_(0, 0.3)
            module.lora_A[POLICY].copy_(theirs.lora_A["default"].weight)
            module.lora_B[POLICY].copy_(theirs.lora_B["default"].weight)

    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._generate_and_score_completions(
        [{"prompt": [{"role": "user", "content": p}]} for p in prompts for _ in range(group)])
    trl_loss = trainer._compute_loss(trainer.model, batch)
    trl_loss.backward()

    rows = batch["completion_ids"].tolist()
    stopped = [EOS in row for row in rows]
    assert 0 < sum(stopped) < len(rows), "the fixture should give both stopped and truncated completions"
    if mask_truncated:
        assert [bool(m.any()) for m in batch["completion_mask"]] == stopped  # TRL masked exactly the cut ones
    assert learner._prompt_ids(prompts[0]) == batch["prompt_ids"][0][batch["prompt_mask"][0].bool()].tolist()
    rollouts = []
    for g, prompt in enumerate(prompts):
        members = range(g * group, (g + 1) * group)
        ids = [rows[i][:rows[i].index(EOS)] if stopped[i] else rows[i] for i in members]
        rollouts.append(Rollout(task="arithmetic", seed=0, difficulty=1, prompt=prompt,
                                completions=["" for _ in members], rewards=[scored[i] for i in members],
                                finish_reasons=["stop" if stopped[i] else "length" for i in members],
                                completion_ids=ids))
    stats = learner.train_step(rollouts)

    assert stats["loss"] == pytest.approx(trl_loss.item(), abs=1e-5)
    assert trl_loss.item() != 0.0
    for name, module in ours.items():
        theirs = trainer.model.get_submodule(f"base_model.model.{name}")
        for ours_param, theirs_param in ((module.lora_A[POLICY], theirs.lora_A["default"].weight),
                                         (module.lora_B[POLICY], theirs.lora_B["default"].weight)):
            assert torch.allclose(ours_param.grad, theirs_param.grad, atol=1e-5, rtol=1e-4), name
