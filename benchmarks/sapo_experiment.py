"""SAPO's experiment (arXiv 2509.08721, Figure 1 / Table 1) at a scale two CPU cores allow.

    python benchmarks/sapo_experiment.py warmup [--warmup-n 4000] [--warmup-steps 400] [--warmup-lr 6e-3]
    python benchmarks/sapo_experiment.py measure [--model nano] [--adapter A] [--n 16]
    python benchmarks/sapo_experiment.py run --rounds R [--seeds 0 1 2] [--splits 8/0 6/2 4/4 2/6] [--peers 8]
    python benchmarks/sapo_experiment.py report

`warmup`: nano never writes <answer> tags (mean reward 0.0 on every config), so the peers start from a
short LoRA SFT on the answer format: OUT/warmup/sft.jsonl holds prompt/completion pairs from a mixture
of every candidate config of every task (training seeds; the completion is the source's reference,
`<answer>ANSWER</answer>`), trained with `qwenlab train sft` into OUT/warmup/adapter; its settings,
loss and time go to OUT/warmup/settings.json. `measure` and `run` use that adapter by default.
`measure`: the starting model's mean reward on each candidate config of each task (greedy would hide
the spread of sampled rewards, so it samples G completions per question at the run's temperature, as
a round does); SAPO's tasks gave Qwen2.5-0.5B a mean reward between 0.1 and 0.6. Per task it picks
the candidate in that range closest to 0.35 into OUT/chosen_configs.json (a task with none in range
is left out of the run, and said so); OUT/measured_start.json keeps every measured figure.
`run`: for each split I/J of 8 rollout groups per round and each seed, 8 peers, each its own process
and its own hivemind DHT node on loopback (qwenlab.swarm.local), train R rounds of GRPO on the
chosen tasks (`reasoning_gym:NAME@OUT/configs/NAME.yaml`, one per task: each round's local groups are
one question each of different tasks from a drawn start, as the paper's multi-task rounds). 8/0 runs
the same peers with no network. Each configuration writes OUT/<split>-seed<s>/result.json when it is complete and is
skipped when that file exists (resumable per configuration; a killed one is run again from the start).
`report`: OUT/sapo_table.md (the paper's figures beside ours, mean ± std over seeds) and
OUT/sapo_cumulative_reward.png (Figure-1 style: cumulative reward summed over peers, per round).

Cumulative reward, as the paper: Σ over peers and rounds of the reward of the peer's own rollouts
that round (here: the mean reward of its local groups, in [0, 1]; the paper sums per-round rewards of
its 8 agents, so absolute numbers differ in scale, and only ratios between splits compare).
Held-out accuracy: greedy accuracy of the starting adapter and of each peer's final adapter on
evaluation seeds of the mixture (seeds < 1,000,000, never trained on), mean over peers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PAPER = {"8/0": 561.79, "6/2": 854.43, "4/4": 1093.31, "2/6": 945.87}
# Tiny-model-friendly reasoning-gym tasks (short prompts), each with candidate configs from easy to
# hard; `measure` picks, per task, the one whose starting mean reward lies in [0.1, 0.6].
TASK_LADDERS = {
    "basic_arithmetic": [
        {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"],
         "allow_parentheses": False, "allow_negation": False},
        {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+", "-"],
         "allow_parentheses": False, "allow_negation": False},
        {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2, "allow_parentheses": False,
         "allow_negation": False},
    ],
    "chain_sum": [{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
                  {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
                  {"min_terms": 3, "max_terms": 4, "min_digits": 2, "max_digits": 2}],
    "count_bits": [{"max_n": 16}, {"max_n": 256}, {"max_n": 4096}],
    "spell_backward": [{"min_word_len": 3, "max_word_len": 3}, {"min_word_len": 3, "max_word_len": 5},
                       {"min_word_len": 5, "max_word_len": 7}],
    "letter_counting": [{"min_words": 1, "max_words": 2}, {"min_words": 2, "max_words": 4},
                        {"min_words": 4, "max_words": 8}],
    "simple_equations": [{"min_terms": 2, "max_terms": 2, "min_value": 1, "max_value": 9},
                         {"min_terms": 2, "max_terms": 2, "min_value": 1, "max_value": 30},
                         {"min_terms": 2, "max_terms": 3, "min_value": 1, "max_value": 50}],
    "gcd": [{"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 20},
            {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 100},
            {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 1000}],
    "products": [{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
                 {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
                 {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2}],
}
REWARD_RANGE = (0.1, 0.6)


def spelling(out: Path, name: str, config: dict, tag: str = "") -> str:
    """reasoning_gym:NAME@OUT/configs/NAME[tag].yaml, written here."""
    import yaml

    folder = out / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{tag}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return f"reasoning_gym:{name}@{path}"


def default_adapter(args) -> str | None:
    """--adapter, else OUT/warmup/adapter when `warmup` made one, else none."""
    if args.adapter:
        return None if args.adapter == "none" else args.adapter
    made = Path(args.out) / "warmup" / "adapter"
    return str(made) if (made / "adapter_config.json").is_file() else None


def chosen_tasks(args) -> dict[str, dict]:
    path = Path(args.out) / "chosen_configs.json"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no chosen task configs; run `measure` first")
    chosen = json.loads(path.read_text())
    if not chosen:
        raise SystemExit(f"error: {path}: no task config had a starting reward in {REWARD_RANGE}")
    return chosen


# ---- warmup -------------------------------------------------------------------------------------
def warmup(args) -> None:
    import subprocess
    import sys

    import yaml

    from qwenlab.train.data import sft_records_from_task, write_jsonl

    root = Path(args.out) / "warmup"
    root.mkdir(parents=True, exist_ok=True)
    spec = {"seed": 0, "tasks": [{"task": f"reasoning_gym:{name}", "weight": 1, "config": config}
                                 for name in args.tasks for config in TASK_LADDERS[name]]}
    (root / "mix.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    started = time.monotonic()
    records = sft_records_from_task(f"mix:{root / 'mix.yaml'}", args.warmup_n, seed=0)
    write_jsonl(records, root / "sft.jsonl", force=True)
    command = [sys.executable, "-m", "qwenlab", "train", "sft", "--base", args.model, "--data", str(root / "sft.jsonl"),
               "--out", str(root / "adapter"), "--steps", str(args.warmup_steps), "--batch-size", "16",
               "--learning-rate", str(args.warmup_lr), "--lora-r", "8", "--lora-alpha", "16",
               "--lora-dropout", "0", "--val-fraction", "0", "--save-steps", "0", "--threads", str(args.threads),
               "--no-progress", "--force"]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    settings = {"command": command, "examples": len(records), "steps": args.warmup_steps,
                "learning_rate": args.warmup_lr, "lora_r": 8, "lora_alpha": 16, "batch_size": 16,
                "mixture": spec, "seconds": round(time.monotonic() - started, 1),
                "example": records[0]}
    history = root / "adapter" / "loss_history.json"
    if history.is_file():
        settings["loss_history"] = json.loads(history.read_text())
    (root / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"warm start: {len(records)} examples, {args.warmup_steps} steps in {settings['seconds']} s -> "
          f"{root / 'adapter'}", flush=True)


# ---- measure ------------------------------------------------------------------------------------
def measure(args) -> None:
    from qwenlab.adapters import active_adapters, attach_adapter
    from qwenlab.loading import load
    from qwenlab.model.generate import GenerationConfig, generate
    from qwenlab.tasks import sample_instances, score_instance

    import torch

    torch.set_num_threads(args.threads)
    root, adapter = Path(args.out), default_adapter(args)
    model, tokenizer, _ = load(args.model, "fp32")
    if adapter:
        attach_adapter(model, adapter, "start")
    rows, chosen = [], {}
    for name in args.tasks:
        for rung, config in enumerate(TASK_LADDERS[name]):
            task = spelling(root, name, config, f"-candidate{rung}")
            instances = sample_instances(task, args.n, seed=1)  # evaluation seeds other than the report's
            prompts = [i.prompt for i in instances for _ in range(args.generations)]
            settings = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0)
            with active_adapters(model, "start" if adapter else None):
                completions = generate(model, tokenizer, prompts, settings, chat=True)
            rewards = [score_instance(instances[k // args.generations], c.text) for k, c in enumerate(completions)]
            mean = sum(rewards) / len(rewards)
            rows.append({"task": name, "candidate": rung, "config": config, "mean_reward": round(mean, 4),
                         "samples": len(rewards), "example": completions[0].text[:60],
                         "in_range": REWARD_RANGE[0] <= mean <= REWARD_RANGE[1]})
            print(json.dumps(rows[-1]), flush=True)
        fits = [r for r in rows if r["task"] == name and r["in_range"]]
        if fits:
            best = min(fits, key=lambda r: (abs(r["mean_reward"] - 0.35), r["candidate"]))
            chosen[name] = {"config": best["config"], "mean_reward": best["mean_reward"], "candidate": best["candidate"]}
        else:
            print(f"{name}: no candidate config in {REWARD_RANGE}; left out of the run", flush=True)
    measured = {"model": args.model, "adapter": adapter, "n": args.n, "generations": args.generations,
                "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "rows": rows}
    (root / "measured_start.json").write_text(json.dumps(measured, indent=2) + "\n")
    (root / "chosen_configs.json").write_text(json.dumps(chosen, indent=2) + "\n")
    picked = ", ".join(f"{k} {v['mean_reward']}" for k, v in chosen.items())
    print(f"chosen: {picked or 'none'}", flush=True)


# ---- run ----------------------------------------------------------------------------------------
def task_spellings(args) -> list[str]:
    """The chosen tasks, one spelling each, config files under OUT/configs (the same files every run)."""
    root = Path(args.out)
    return [spelling(root, name, entry["config"]) for name, entry in chosen_tasks(args).items()]


def peer_configs(split: str, seed: int, args, out: Path, tasks: list[str], adapter: str | None):
    from qwenlab.swarm import PeerConfig
    from qwenlab.swarm.local import write_seeded_identity
    from qwenlab.train.grpo import GRPOConfig

    local, external = map(int, split.split("/"))
    swarm_name, configs = f"sapo-{split.replace('/', '-')}-{seed}-{time.time_ns()}", []
    for index in range(args.peers):
        folder = out / f"peer{index}"
        write_seeded_identity(folder, f"sapo:{seed}:{index}")  # the same peer draws the same tasks in every split
        grpo = GRPOConfig(model=args.model, tasks=tasks, init_adapter=adapter,
                          num_generations=args.generations, learning_rate=args.learning_rate,
                          temperature=args.temperature, max_new_tokens=args.max_new_tokens, beta=0.0,
                          epsilon=0.2, epsilon_high=0.28, seed=seed * 1000 + index)
        configs.append(PeerConfig(grpo=grpo, out=str(folder), swarm=swarm_name, network=external > 0,
                                  host="127.0.0.1", local=local, external=external, rounds=args.rounds,
                                  save_every=max(1, args.rounds), resume=False, quiet=True,
                                  external_selection="drop_zero_advantage"))
    return configs


def held_out(args, tasks: list[str], adapters: list[str | None]) -> list[float]:
    """Greedy mean score over eval_n evaluation instances of every task (seed 0, never trained on),
    for each adapter (None: the base alone)."""
    from qwenlab.adapters import active_adapters, attach_adapter, detach_adapter
    from qwenlab.eval.task_eval import evaluate_tasks
    from qwenlab.loading import load

    import torch

    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load(args.model, "fp32")
    scores = []
    for adapter in adapters:
        if adapter:
            attach_adapter(model, adapter, "candidate")
        with active_adapters(model, "candidate" if adapter else None):
            result = evaluate_tasks(model, tokenizer, tasks, n=args.eval_n, seed=0, progress=False,
                                    max_new_tokens=args.max_new_tokens)
        scores.append(round(statistics.mean(r.accuracy for r in result.values()), 4))
        if adapter:
            detach_adapter(model, "candidate")
    return scores


def run(args) -> None:
    from qwenlab.swarm.local import run_local_swarm

    root = Path(args.out)
    tasks, adapter = task_spellings(args), default_adapter(args)
    before_file = root / "held_out_before.json"  # the same start for every configuration: measured once
    if before_file.is_file() and json.loads(before_file.read_text()).get("key") == [tasks, adapter, args.eval_n]:
        before = json.loads(before_file.read_text())["score"]
    else:
        before = held_out(args, tasks, [adapter])[0]
        before_file.write_text(json.dumps({"key": [tasks, adapter, args.eval_n], "score": before}) + "\n")
    print(f"tasks: {', '.join(tasks)}; start adapter {adapter}; held-out before {before:.3f}", flush=True)
    for seed in args.seeds:  # seeds outermost: a cut-short sweep still has every split at the first seeds
        for split in args.splits:
            out = root / f"{split.replace('/', '-')}-seed{seed}"
            if (out / "result.json").is_file():
                print(f"{out}: done, skipped", flush=True)
                continue
            started = time.monotonic()
            codes = run_local_swarm(peer_configs(split, seed, args, out, tasks, adapter), threads=1,
                                    timeout_s=args.timeout_s)
            peers = [[json.loads(line) for line in (out / f"peer{i}" / "rounds.jsonl").read_text().splitlines()]
                     if (out / f"peer{i}" / "rounds.jsonl").is_file() else [] for i in range(args.peers)]
            per_round = [sum(rows[r]["local_reward"] for rows in peers if r < len(rows))
                         for r in range(max(map(len, peers)))]
            swarm_s = time.monotonic() - started
            after = held_out(args, tasks, [str(out / f"peer{i}" / "adapter") for i in range(args.peers)
                                           if (out / f"peer{i}" / "adapter").is_dir()])
            result = {"split": split, "seed": seed, "rounds": args.rounds, "peers": args.peers, "exit_codes": codes,
                      "rounds_done": [len(rows) for rows in peers],
                      "cumulative_reward": round(sum(per_round), 3), "reward_per_round": per_round,
                      "external_used": sum(r["external_used"] for rows in peers for r in rows),
                      "dropped_zero_advantage": sum(r.get("dropped_zero_advantage", 0) for rows in peers for r in rows),
                      "held_out_before": before, "held_out_after_mean": round(statistics.mean(after), 4) if after else None,
                      "held_out_after": after, "swarm_seconds": round(swarm_s, 1),
                      "seconds": round(time.monotonic() - started, 1), "tasks": tasks, "adapter": adapter,
                      "settings": {k: v for k, v in vars(args).items() if k != "func"}}
            (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
            print(f"{split} seed {seed}: cumulative reward {result['cumulative_reward']}, held-out "
                  f"{before:.3f} -> {result['held_out_after_mean']} ({result['seconds']} s)", flush=True)
    report(args)


# ---- report -------------------------------------------------------------------------------------
def report(args) -> None:
    root = Path(args.out)
    results = [json.loads(p.read_text()) for p in sorted(root.glob("*-seed*/result.json"))]
    by_split: dict[str, list[dict]] = {}
    for r in results:
        by_split.setdefault(r["split"], []).append(r)
    lines = ["| split (local/external) | paper cumulative reward | paper / 8/0 | ours: mean ± std over seeds (n) "
             "| ours / 8/0 | ours per seed | held-out before → after (per seed) | external groups used / dropped "
             "(zero advantage) |", "|---|---:|---:|---:|---:|---|---|---|"]
    solo = statistics.mean(r["cumulative_reward"] for r in by_split["8/0"]) if "8/0" in by_split else None
    for split in ("8/0", "6/2", "4/4", "2/6"):
        rows = sorted(by_split.get(split, []), key=lambda r: r["seed"])
        if not rows:
            lines.append(f"| {split} | {PAPER[split]} | {PAPER[split] / PAPER['8/0']:.2f} | not run | | | | |")
            continue
        values = [r["cumulative_reward"] for r in rows]
        mean, spread = statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
        ratio = f"{mean / solo:.2f}" if solo else "-"
        per_seed = " / ".join(f"{v:.2f}" for v in values)
        accuracy = (f"{statistics.mean(r['held_out_before'] for r in rows):.3f} → "
                    f"{statistics.mean(r['held_out_after_mean'] for r in rows):.3f} ("
                    + " / ".join(f"{r['held_out_after_mean']:.3f}" for r in rows) + ")")
        shared = " / ".join(f"{r['external_used']}/{r['dropped_zero_advantage']}" for r in rows)
        lines.append(f"| {split} | {PAPER[split]} | {PAPER[split] / PAPER['8/0']:.2f} | {mean:.2f} ± {spread:.2f} "
                     f"({len(values)}) | {ratio} | {per_seed} | {accuracy} | {shared} |")
    rounds = sorted({r["rounds"] for r in results})
    text = (f"Rounds per run: {', '.join(map(str, rounds)) or '-'}; peers: "
            f"{', '.join(sorted({str(r['peers']) for r in results})) or '-'}.\n\n" + "\n".join(lines) + "\n")
    (root / "sapo_table.md").write_text(text)
    print(text)
    plot(by_split, root / "sapo_cumulative_reward.png")


def plot(by_split: dict[str, list[dict]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for split, rows in sorted(by_split.items()):
        length = min(len(r["reward_per_round"]) for r in rows)
        curves = np.array([np.cumsum(r["reward_per_round"][:length]) for r in rows])
        x = np.arange(1, length + 1)
        ax.plot(x, curves.mean(0), label=f"{split} (n={len(rows)})")
        if len(rows) > 1:
            ax.fill_between(x, curves.min(0), curves.max(0), alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative reward (summed over peers)")
    ax.set_title("SAPO splits, local/external of 8 rollout groups")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["warmup", "measure", "run", "report"])
    parser.add_argument("--out", default="benchmarks/results/sapo")
    parser.add_argument("--model", default="nano")
    parser.add_argument("--adapter", default=None, help="start every peer from this adapter (default: "
                        "OUT/warmup/adapter when `warmup` made one; 'none': the bare model)")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_LADDERS), choices=list(TASK_LADDERS),
                        help="warmup/measure: the candidate tasks (run takes OUT/chosen_configs.json)")
    parser.add_argument("--warmup-n", type=int, default=4000, help="warmup: SFT examples")
    parser.add_argument("--warmup-steps", type=int, default=400, help="warmup: SFT optimizer steps (batch 16)")
    parser.add_argument("--warmup-lr", type=float, default=6e-3, help="warmup: SFT learning rate")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--splits", nargs="+", default=["8/0", "6/2", "4/4", "2/6"], choices=list(PAPER))
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24,
                        help="nano's tokens are short: '<answer>12</answer>' is 15 of them")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--temperature", type=float, default=0.4,
                        help="sampling temperature of measure and the rounds: the warm-started nano gives the "
                        "tag characters low probability, so at 1.0 its samples are mostly garbage")
    parser.add_argument("--eval-n", type=int, default=50, help="held-out instances per task")
    parser.add_argument("--n", type=int, default=16, help="measure: questions per task config")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=7200)
    args = parser.parse_args()
    {"warmup": warmup, "measure": measure, "run": run, "report": report}[args.mode](args)


if __name__ == "__main__":
    main()
