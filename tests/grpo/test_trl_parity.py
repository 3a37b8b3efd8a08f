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
