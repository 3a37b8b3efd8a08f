"""SAPO's experiment (arXiv 2509.08721, Figure 1 / Table 1) at a scale two CPU cores allow.

    python benchmarks/sapo_experiment.py measure [--model nano] [--adapter A] [--n 64]
    python benchmarks/sapo_experiment.py run --rounds R [--seeds 0 1 2] [--splits 8/0 6/2 4/4 2/6] [--peers 8]
    python benchmarks/sapo_experiment.py report

`measure`: the starting model's mean reward on each candidate task config (greedy would hide the
spread of sampled rewards, so it samples G completions per question at the run's temperature, as a
round does); SAPO's tasks gave Qwen2.5-0.5B a mean reward between 0.1 and 0.6.
`run`: for each split I/J of 8 rollout groups per round and each seed, 8 peers, each its own process
and its own hivemind DHT node on loopback (qwenlab.swarm.local), train R rounds of GRPO on the
mixture OUT/mix.yaml (one question per sampled task per group, as the paper). 8/0 runs the same peers
with no network. Each configuration writes OUT/<split>-seed<s>/result.json when it is complete and is
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
# Tiny-model-friendly reasoning-gym tasks and the configs measured on nano (see `measure`). Short prompts.
TASK_CONFIGS = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "count_bits": {"max_n": 16},
    "spell_backward": {"min_word_len": 3, "max_word_len": 3},
    "letter_counting": {"min_words": 1, "max_words": 2},
    "simple_equations": {"min_terms": 2, "max_terms": 2, "min_value": 1, "max_value": 9},
    "gcd": {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 20},
    "products": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
}


def write_mix(out: Path, names: list[str]) -> Path:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    spec = {"tasks": [{"task": f"reasoning_gym:{n}", "weight": 1, "config": TASK_CONFIGS[n]} for n in names]}
    path = out / "mix.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---- measure ------------------------------------------------------------------------------------
def measure(args) -> None:
    from qwenlab.adapters import active_adapters, attach_adapter
    from qwenlab.loading import load
    from qwenlab.model.generate import GenerationConfig, generate
    from qwenlab.tasks import sample_instances, score_instance

    import torch

    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load(args.model, "fp32")
    if args.adapter:
        attach_adapter(model, args.adapter, "start")
    rows = []
    for name in args.tasks:
        folder = Path(args.out) / "configs"
        folder.mkdir(parents=True, exist_ok=True)
        import yaml

        (folder / f"{name}.yaml").write_text(yaml.safe_dump(TASK_CONFIGS[name]))
        spelling = f"reasoning_gym:{name}@{folder / f'{name}.yaml'}"
        instances = sample_instances(spelling, args.n, seed=1)  # evaluation seeds other than the report's
        prompts = [i.prompt for i in instances for _ in range(args.generations)]
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0)
        with active_adapters(model, "start" if args.adapter else None):
            completions = generate(model, tokenizer, prompts, config, chat=True)
        rewards = [score_instance(instances[k // args.generations], c.text) for k, c in enumerate(completions)]
        mean = sum(rewards) / len(rewards)
        rows.append({"task": name, "config": TASK_CONFIGS[name], "mean_reward": round(mean, 4),
                     "example": completions[0].text[:60], "in_range": 0.1 <= mean <= 0.6})
        print(json.dumps(rows[-1]), flush=True)
    (Path(args.out) / "measured_start.json").write_text(json.dumps(rows, indent=2) + "\n")


# ---- run ----------------------------------------------------------------------------------------
def peer_configs(split: str, seed: int, args, out: Path, mix: Path):
    from qwenlab.swarm import PeerConfig
    from qwenlab.swarm.local import write_seeded_identity
    from qwenlab.train.grpo import GRPOConfig

    local, external = map(int, split.split("/"))
    swarm_name, configs = f"sapo-{split.replace('/', '-')}-{seed}-{time.time_ns()}", []
    for index in range(args.peers):
        folder = out / f"peer{index}"
        write_seeded_identity(folder, f"sapo:{seed}:{index}")  # the same peer draws the same tasks in every split
        grpo = GRPOConfig(model=args.model, tasks=[f"mix:{mix}"], init_adapter=args.adapter,
                          num_generations=args.generations, learning_rate=args.learning_rate,
                          temperature=args.temperature, max_new_tokens=args.max_new_tokens, beta=0.0,
                          epsilon=0.2, epsilon_high=0.28, seed=seed * 1000 + index)
        configs.append(PeerConfig(grpo=grpo, out=str(folder), swarm=swarm_name, network=external > 0,
                                  host="127.0.0.1", local=local, external=external, rounds=args.rounds,
                                  save_every=max(1, args.rounds), resume=False, quiet=True,
                                  external_selection="drop_zero_advantage"))
    return configs


def held_out(args, mix: Path, adapters: list[str | None]) -> list[float]:
    from qwenlab.adapters import active_adapters, attach_adapter, detach_adapter
    from qwenlab.eval.task_eval import evaluate_tasks
    from qwenlab.loading import load

    model, tokenizer, _ = load(args.model, "fp32")
    task, scores = f"mix:{mix}", []
    for adapter in adapters:
        if adapter:
            attach_adapter(model, adapter, "candidate")
        with active_adapters(model, "candidate" if adapter else None):
            result = evaluate_tasks(model, tokenizer, [task], n=args.eval_n, seed=0, progress=False,
                                    max_new_tokens=args.max_new_tokens)
        scores.append(result[task].accuracy)
        if adapter:
            detach_adapter(model, "candidate")
    return scores


def run(args) -> None:
    from qwenlab.swarm.local import run_local_swarm

    root = Path(args.out)
    mix = write_mix(root, args.tasks)
    for split in args.splits:
        for seed in args.seeds:
            out = root / f"{split.replace('/', '-')}-seed{seed}"
            if (out / "result.json").is_file():
                print(f"{out}: done, skipped", flush=True)
                continue
            started = time.monotonic()
            codes = run_local_swarm(peer_configs(split, seed, args, out, mix), threads=1,
                                    timeout_s=args.timeout_s)
            peers = [[json.loads(line) for line in (out / f"peer{i}" / "rounds.jsonl").read_text().splitlines()]
                     for i in range(args.peers)]
            per_round = [sum(rows[r]["local_reward"] for rows in peers if r < len(rows))
                         for r in range(max(map(len, peers)))]
            before = held_out(args, mix, [args.adapter])[0]
            after = held_out(args, mix, [str(out / f"peer{i}" / "adapter") for i in range(args.peers)])
            result = {"split": split, "seed": seed, "rounds": args.rounds, "peers": args.peers, "exit_codes": codes,
                      "cumulative_reward": round(sum(per_round), 3), "reward_per_round": per_round,
                      "external_used": sum(r["external_used"] for rows in peers for r in rows),
                      "dropped_zero_advantage": sum(r.get("dropped_zero_advantage", 0) for rows in peers for r in rows),
                      "held_out_before": before, "held_out_after_mean": round(statistics.mean(after), 4),
                      "held_out_after": after, "seconds": round(time.monotonic() - started, 1),
                      "settings": {k: v for k, v in vars(args).items() if k != "func"}}
            (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
            print(f"{split} seed {seed}: cumulative reward {result['cumulative_reward']}, held-out "
                  f"{before:.3f} -> {result['held_out_after_mean']:.3f} ({result['seconds']} s)", flush=True)
    report(args)


# ---- report -------------------------------------------------------------------------------------
def report(args) -> None:
    root = Path(args.out)
    results = [json.loads(p.read_text()) for p in sorted(root.glob("*-seed*/result.json"))]
    by_split: dict[str, list[dict]] = {}
    for r in results:
        by_split.setdefault(r["split"], []).append(r)
    lines = ["| split (local/external) | paper cumulative reward | ours: mean ± std over seeds (n) | ours / 8/0 "
             "| paper / 8/0 | held-out before → after |", "|---|---:|---:|---:|---:|---|"]
    solo = statistics.mean(r["cumulative_reward"] for r in by_split["8/0"]) if "8/0" in by_split else None
    for split in ("8/0", "6/2", "4/4", "2/6"):
        rows = by_split.get(split, [])
        if not rows:
            lines.append(f"| {split} | {PAPER[split]} | not run | | {PAPER[split] / PAPER['8/0']:.2f} | |")
            continue
        values = [r["cumulative_reward"] for r in rows]
        mean, spread = statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
        ratio = f"{mean / solo:.2f}" if solo else "-"
        accuracy = (f"{statistics.mean(r['held_out_before'] for r in rows):.3f} → "
                    f"{statistics.mean(r['held_out_after_mean'] for r in rows):.3f}")
        lines.append(f"| {split} | {PAPER[split]} | {mean:.2f} ± {spread:.2f} ({len(values)}) | {ratio} | "
                     f"{PAPER[split] / PAPER['8/0']:.2f} | {accuracy} |")
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
    parser.add_argument("mode", choices=["measure", "run", "report"])
    parser.add_argument("--out", default="benchmarks/results/sapo")
    parser.add_argument("--model", default="nano")
    parser.add_argument("--adapter", default=None, help="start every peer from this adapter (an SFT warm start)")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_CONFIGS), choices=list(TASK_CONFIGS))
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--splits", nargs="+", default=["8/0", "6/2", "4/4", "2/6"], choices=list(PAPER))
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--n", type=int, default=64, help="measure: questions per task config")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=7200)
    args = parser.parse_args()
    {"measure": measure, "run": run, "report": report}[args.mode](args)


if __name__ == "__main__":
    main()
