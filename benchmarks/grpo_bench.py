"""GRPO on the CPU, qwenlab against TRL's GRPOTrainer: rollouts/s, step time and peak memory on the same model, LoRA,
prompts, num_generations and completion length.

  trl      TRL's GRPOTrainer: transformers' generate, PEFT LoRA r8 on all linears, TRL's loss; no vLLM
  qwenlab  qwenlab.train.grpo: rollouts on the native decode stack (fp32: the LoRA merged into the weights for the
           rollout; bf16: its deltas added per row), no copy of the base; the loss from completion positions only,
           in chunks of the head
--dtype bf16: qwenlab's frozen base in bf16 (LoRA fp32), TRL with bf16=True (autocast over the fp32 model).

    python benchmarks/grpo_bench.py [--models nano,qwen2.5-0.5b] [--prompts 4] [--generations 8]
                                    [--max-new-tokens 32] [--steps 2] [--threads 2]

Each engine runs in its own subprocess (so its peak RSS is its own), one warm-up step and then --steps timed
steps. A preset name (qwen2.5-0.5b) is a random-weight model of that exact shape with nano's tokenizer, written once
with `qwenlab random`: the same cost per token as the real model. Rewards are random 0/1 on both sides so both
do the full forward and backward every step (qwenlab skips groups without reward spread; TRL does not).
Both sides stop a completion at the end-of-turn token or --max-new-tokens (a random-weight model rarely samples
the stop token, so its completions are full length; nano's are shorter on both sides alike).

Per engine: generation seconds per step (TRL: its _generate, timed around the call), whole-step seconds,
rollouts/s = prompts x generations / seconds, and peak RSS. Medians over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def random_rewards(completions) -> list[float]:
    rng = random.Random(str(completions))
    return [float(rng.random() < 0.5) for _ in completions]


def trl_reward(prompts, completions, **kwargs):
    return random_rewards(completions)


def time_trl(model_dir: str, prompts: int, generations: int, steps: int, max_new_tokens: int, out: str,
             dtype: str) -> dict:
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
                      bf16=dtype == "bf16", use_cpu=True, gradient_checkpointing=False, report_to="none", logging_steps=1,
                      save_strategy="no", temperature=1.0, seed=0, dataloader_num_workers=0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    steps_s: list[float] = []
    generate_s: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()
            generate_s.append(0.0)

        def on_step_end(self, *a, **k):
            steps_s.append(time.perf_counter() - self.started)

    trainer = GRPOTrainer(model=model, args=args, train_dataset=data, reward_funcs=trl_reward,
                          processing_class=tokenizer, peft_config=lora, callbacks=[Timer()])
    generate = trainer._generate

    def timed_generate(*a, **k):
        started = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            if generate_s:
                generate_s[-1] += time.perf_counter() - started

    trainer._generate = timed_generate  # timed around TRL's own call, nothing else changed
    trainer.train()
    return {"step_s": statistics.median(steps_s[1:]), "generate_s": statistics.median(generate_s[1:])}


def time_qwenlab(model_dir: str, prompts: int, generations: int, steps: int, max_new_tokens: int, dtype: str) -> dict:
    from qwenlab.train.grpo import GRPOConfig, GRPOLearner, draw_instances

    learner = GRPOLearner.create(GRPOConfig(model=model_dir, batch=prompts, num_generations=generations,
                                            max_new_tokens=max_new_tokens, learning_rate=2e-4, dtype=dtype))
    rows = []
    for step in range(steps + 1):
        started = time.perf_counter()
        instances = draw_instances(["arithmetic"], prompts, f"bench:own:{step}")
        rollouts = learner.rollouts(instances, seed=step)
        generated = time.perf_counter()
        for rollout in rollouts:
            rollout.rewards = random_rewards(rollout.completions)
        learner.train_step(rollouts)
        rows.append({"generate_s": generated - started, "step_s": time.perf_counter() - started})
    timed = rows[1:]
    return {"step_s": statistics.median(r["step_s"] for r in timed),
            "generate_s": statistics.median(r["generate_s"] for r in timed)}


def child(engine: str, args) -> dict:
    torch.set_num_threads(args.threads)
    if engine == "trl":
        figures = time_trl(args.model, args.prompts, args.generations, args.steps, args.max_new_tokens,
                           str(args.work_dir / "trl-out"), args.dtype)
    else:
        figures = time_qwenlab(args.model, args.prompts, args.generations, args.steps, args.max_new_tokens, args.dtype)
    figures["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return figures


def model_folder(name: str, work: Path) -> str:
    """The folder for `name`: lora_bench's (a preset is a random-weight model with nano's tokenizer), as a path."""
    from lora_bench import model_folder as bench_model_folder  # benchmarks/ is this script's folder

    from qwenlab.checkpoint import open_checkpoint

    return str(open_checkpoint(bench_model_folder(name, work, "nano")).path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="nano,qwen2.5-0.5b")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default="qwenlab,trl")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: qwenlab's base weights in bf16 (LoRA fp32); TRL with bf16=True (autocast)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwenlab-grpo-bench")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return
    rollouts = args.prompts * args.generations
    print(f"GRPO, {args.prompts} prompts x {args.generations} generations, {args.max_new_tokens} new tokens each, LoRA r8 "
          f"on all linears, {args.dtype}, {args.threads} threads, {args.steps} timed steps after one warm-up\n")
    print("| model | engine | generate s/step | rollouts/s (generation) | step s | rollouts/s (step) | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        folder = model_folder(name.strip(), args.work_dir)
        results = {}
        for engine in args.engines.split(","):
            command = [sys.executable, __file__, "--child", engine, "--model", folder, "--prompts", str(args.prompts),
                       "--generations", str(args.generations), "--steps", str(args.steps), "--max-new-tokens",
                       str(args.max_new_tokens), "--threads", str(args.threads), "--work-dir", str(args.work_dir),
                       "--dtype", args.dtype]
            done = subprocess.run(command, capture_output=True, text=True)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if done.returncode or line is None:
                sys.exit(f"{name} / {engine}: benchmark run failed:\n{done.stderr[-3000:]}")
            r = results[engine] = json.loads(line[7:])
            print(f"| {name} | {engine} | {r['generate_s']:.2f} | {rollouts / r['generate_s']:.1f} | {r['step_s']:.2f} | "
                  f"{rollouts / r['step_s']:.1f} | {r['peak_rss_mib']} |", flush=True)
        if {"qwenlab", "trl"} <= set(results):
            q, t = results["qwenlab"], results["trl"]
            print(f"| {name} | qwenlab / TRL | {t['generate_s'] / q['generate_s']:.2f}x faster | | "
                  f"{t['step_s'] / q['step_s']:.2f}x faster | | {q['peak_rss_mib'] / t['peak_rss_mib']:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
