"""SAPO (4 local + 4 external rollouts per round) against solo (8 local + 0) on nano, same compute per peer.

    python benchmarks/swarm_experiment.py --rounds 30 --seeds 0 1 2 [--peers 4] [--out /tmp/swarm-exp]

For each seed, the same N peers (same deterministic keys, so the same task draws and LoRA inits)
run R rounds twice: as a SAPO swarm over hivemind on loopback, and solo with no network. Every peer
trains on 8 groups of G completions per round in both arms; a SAPO peer generates 4 of them and
takes 4 from the others (slots the swarm cannot fill yet are generated locally, and counted).
Reported per arm, mean over peers:
  cumulative reward   Σ over rounds of the mean reward of the peer's OWN rollouts that round
                      (on-policy: what its current adapter earns), as SAPO reports it
  final eval          greedy accuracy of each peer's final adapter on evaluation seeds (n instances)
and the ratio SAPO / solo. Writes OUT/results.json and OUT/cumulative_reward.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def peer_configs(arm: str, seed: int, args, out: Path):
    from qwenlab.swarm import PeerConfig
    from qwenlab.swarm.local import write_seeded_identity
    from qwenlab.train.grpo import GRPOConfig

    configs, swarm_name = [], f"exp-{seed}-{time.time_ns()}"  # one name for the arm's peers
    local, external = (4, 4) if arm == "sapo" else (8, 0)
    for index in range(args.peers):
        folder = out / f"seed{seed}" / arm / f"peer{index}"
        write_seeded_identity(folder, f"swarm-experiment:{seed}:{index}")  # same peer, same draws, in both arms
        grpo = GRPOConfig(model=args.model, tasks=[args.task], difficulty=args.difficulty,
                          num_generations=args.generations, learning_rate=args.learning_rate,
                          temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, seed=seed * 1000 + index)
        configs.append(PeerConfig(grpo=grpo, out=str(folder), swarm=swarm_name,
                                  network=arm == "sapo", host="127.0.0.1", local=local, external=external,
                                  rounds=args.rounds, save_every=args.rounds, resume=False, quiet=True))
    return configs


def evaluate_adapters(args, folders: list[Path]) -> list[float]:
    from qwenlab.adapters import active_adapters, attach_adapter
    from qwenlab.eval.task_eval import evaluate_tasks
    from qwenlab.model import load_model, load_tokenizer
    from qwenlab.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(args.model)
    model, tokenizer = load_model(checkpoint), load_tokenizer(checkpoint.path)
    scores = []
    for index, folder in enumerate(folders):
        attach_adapter(model, folder / "adapter", f"peer{index}")
        with active_adapters(model, f"peer{index}"):
            result = evaluate_tasks(model, tokenizer, [args.task], n=args.eval_n, seed=0, difficulty=args.difficulty,
                                    progress=False)[args.task]
        scores.append(result.accuracy)
    return scores


def base_accuracy(args) -> float:
    from qwenlab.eval.task_eval import evaluate_tasks
    from qwenlab.checkpoint import open_checkpoint
    from qwenlab.model import load_model, load_tokenizer

    checkpoint = open_checkpoint(args.model)
    model, tokenizer = load_model(checkpoint), load_tokenizer(checkpoint.path)
    return evaluate_tasks(model, tokenizer, [args.task], n=args.eval_n, seed=0, difficulty=args.difficulty,
                          progress=False)[args.task].accuracy


def read_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]


def run_arm(arm: str, seed: int, args, out: Path) -> dict:
    from qwenlab.swarm.local import run_local_swarm

    configs = peer_configs(arm, seed, args, out)
    started = time.time()
    codes = run_local_swarm(configs, threads=args.threads, timeout_s=args.timeout)
    seconds = time.time() - started
    folders = [Path(c.out) for c in configs]
    rows = [read_rows(f) for f in folders]
    curves = [[r["local_reward"] for r in peer_rows] for peer_rows in rows]
    cumulative = [sum(c) for c in curves]
    evals = evaluate_adapters(args, folders)
    return {
        "arm": arm, "seed": seed, "exit_codes": codes, "wall_s": round(seconds, 1),
        "rounds_done": [len(r) for r in rows],
        "cumulative_reward_per_peer": [round(c, 3) for c in cumulative],
        "cumulative_reward_mean": round(statistics.mean(cumulative), 3),
        "curves": curves,
        "final_eval_per_peer": evals, "final_eval_mean": round(statistics.mean(evals), 4),
        "external_used": sum(r["external_used"] for peer_rows in rows for r in peer_rows),
        "fallback_local": sum(r["fallback_local"] for peer_rows in rows for r in peer_rows),
        "rejected": sum(r["rejected"] for peer_rows in rows for r in peer_rows),
        "seconds_generate_per_round": round(statistics.mean(r["seconds_generate"] for p in rows for r in p), 3),
        "seconds_train_per_round": round(statistics.mean(r["seconds_train"] for p in rows for r in p), 3),
    }


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {"sapo": "tab:blue", "solo": "tab:orange"}
    labelled = set()
    for result in results:
        mean_curve = [statistics.mean(values) for values in zip(*result["curves"])]
        cumulative, total = [], 0.0
        for value in mean_curve:
            total += value
            cumulative.append(total)
        label = {"sapo": "SAPO 4 local / 4 external", "solo": "solo 8 local / 0"}[result["arm"]]
        ax.plot(range(1, len(cumulative) + 1), cumulative, color=colours[result["arm"]], alpha=0.8,
                label=None if result["arm"] in labelled else label)
        labelled.add(result["arm"])
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative mean reward per peer")
    ax.set_title("nano, arithmetic: one line per seed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="nano")
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--difficulty", type=int, default=1)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per peer process")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", default="/tmp/qwenlab-swarm-experiment")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    base = base_accuracy(args)
    print(f"base model greedy accuracy on {args.task} (d={args.difficulty}, n={args.eval_n}): {base:.3f}", flush=True)
    for seed in args.seeds:
        for arm in ("sapo", "solo"):
            result = run_arm(arm, seed, args, out)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "curves"}), flush=True)
            (out / "results.json").write_text(json.dumps({"args": vars(args), "base_eval": base,
                                                          "results": results}, indent=2))
    summary = {}
    for arm in ("sapo", "solo"):
        arm_results = [r for r in results if r["arm"] == arm]
        summary[arm] = {"cumulative_reward_mean": round(statistics.mean(r["cumulative_reward_mean"]
                                                                       for r in arm_results), 3),
                        "final_eval_mean": round(statistics.mean(r["final_eval_mean"] for r in arm_results), 4)}
    per_seed = [round(s["cumulative_reward_mean"] / o["cumulative_reward_mean"], 3)
                for s, o in zip(results[0::2], results[1::2]) if o["cumulative_reward_mean"] > 0]
    summary["ratio_cumulative_sapo_over_solo"] = round(summary["sapo"]["cumulative_reward_mean"]
                                                       / max(summary["solo"]["cumulative_reward_mean"], 1e-9), 3)
    summary["ratio_per_seed"] = per_seed
    summary["base_eval"] = base
    (out / "results.json").write_text(json.dumps({"args": vars(args), "summary": summary, "results": results},
                                                 indent=2))
    plot(results, out / "cumulative_reward.png")
    print(json.dumps(summary, indent=2))
    print(f"results: {out / 'results.json'}, plot: {out / 'cumulative_reward.png'}")


if __name__ == "__main__":
    main()
