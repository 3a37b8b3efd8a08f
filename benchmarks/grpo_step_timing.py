"""Time one GRPO step two ways on the same model, LoRA and batch, on the CPU:

  trl    TRL's GRPOTrainer (transformers generate + PEFT LoRA + TRL's loss), bf16 off, no vLLM
  own    qwenlab.train.grpo: rollouts on qwenlab's engine with the LoRA applied, the same loss

    python benchmarks/grpo_step_timing.py [--model nano] [--prompts 8] [--generations 8] [--steps 4] [--threads 2]

Prints seconds per step (median over --steps after one warm-up step), the ratio, and rollouts/s
(prompts x generations per step / seconds per step) for each. This is the
measurement behind the choice documented in qwenlab/train/grpo/trainer.py.
--rewards random (default): random 0/1 rewards on both sides, so both do the full forward/backward
every step (qwenlab skips the backward of groups with no reward spread, TRL does not).
--rewards task: the arithmetic verifier, i.e. what a real run on this model costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def random_rewards(n: int, key: str) -> list[float]:
    import random

    rng = random.Random(key)
    return [float(rng.random() < 0.5) for _ in range(n)]


REWARDS = "random"


def task_rewards(prompts, completions) -> list[float]:
    from qwenlab.tasks import score

    expected = {}
    out = []
    for prompt, completion in zip(prompts, completions):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        user = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        if user not in expected:
            a, op, b = user.removeprefix("What is ").removesuffix("?").split()
            expected[user] = str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
        out.append(score("arithmetic", text, expected[user]))
    return out


def trl_reward(prompts, completions, **kwargs):
    if REWARDS == "task":
        return task_rewards(prompts, completions)
    return random_rewards(len(completions), str(completions))


def time_trl(model_dir: str, prompts: int, generations: int, steps: int, max_new_tokens: int, out: str) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from qwenlab.train.grpo.rollouts import draw_instances

    instances = draw_instances(["arithmetic"], prompts * (steps + 1), "bench:trl")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": i.prompt}]} for i in instances])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=prompts * generations, num_generations=generations,
                      max_completion_length=max_new_tokens, max_steps=steps + 1, learning_rate=2e-4, beta=0.0,
                      bf16=False, use_cpu=True, gradient_checkpointing=False, report_to="none", logging_steps=1,
                      save_strategy="no", temperature=1.0, seed=0, dataloader_num_workers=0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.started)

    trainer = GRPOTrainer(model=model, args=args, train_dataset=data, reward_funcs=trl_reward,
                          processing_class=tokenizer, peft_config=lora, callbacks=[Timer()])
    trainer.train()
    return times[1:]


def time_own(model_dir: str, prompts: int, generations: int, steps: int, max_new_tokens: int) -> list[dict]:
    from qwenlab.train.grpo import GRPOConfig, GRPOLearner, draw_instances

    learner = GRPOLearner.create(GRPOConfig(model=model_dir, batch=prompts, num_generations=generations,
                                            max_new_tokens=max_new_tokens, learning_rate=2e-4))
    rows = []
    for step in range(steps + 1):
        started = time.perf_counter()
        rollouts = learner.rollouts(draw_instances(["arithmetic"], prompts, f"bench:own:{step}"), seed=step)
        generated = time.perf_counter()
        if REWARDS == "random":
            for rollout in rollouts:
                rollout.rewards = random_rewards(len(rollout.completions), str(rollout.completions))
        learner.train_step(rollouts)
        rows.append({"generate": generated - started, "train": time.perf_counter() - generated,
                     "step": time.perf_counter() - started})
    return rows[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="nano")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rewards", choices=["random", "task"], default="random")
    parser.add_argument("--out", default="/tmp/qwenlab-grpo-timing")
    args = parser.parse_args()
    global REWARDS
    REWARDS = args.rewards
    torch.set_num_threads(args.threads)
    from qwenlab.checkpoint import open_checkpoint

    model_dir = str(open_checkpoint(args.model).path)
    own = time_own(model_dir, args.prompts, args.generations, args.steps, args.max_new_tokens)
    trl = time_trl(model_dir, args.prompts, args.generations, args.steps, args.max_new_tokens, args.out)
    own_step = statistics.median(r["step"] for r in own)
    trl_step = statistics.median(trl)
    result = {
        "model": model_dir, "rewards": args.rewards, "prompts": args.prompts, "generations": args.generations,
        "max_new_tokens": args.max_new_tokens, "threads": args.threads, "steps_timed": args.steps,
        "own_step_s": round(own_step, 3),
        "own_generate_s": round(statistics.median(r["generate"] for r in own), 3),
        "own_train_s": round(statistics.median(r["train"] for r in own), 3),
        "trl_step_s": round(trl_step, 3), "trl_over_own": round(trl_step / own_step, 2),
        # rollouts (completions sampled, scored and trained on) per second of a whole step
        "own_rollouts_per_s": round(args.prompts * args.generations / own_step, 1),
        "trl_rollouts_per_s": round(args.prompts * args.generations / trl_step, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
