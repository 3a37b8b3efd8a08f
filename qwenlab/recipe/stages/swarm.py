"""Stage `swarm`: a short local SAPO swarm (GRPO peers sharing rollouts over hivemind) on one task.

    - swarm: {base: nano, adapter: sft-arithmetic, task: arithmetic, peers: 2, rounds: 6, as: swarm-arithmetic}

Peers run as separate processes on loopback (peer 0 bootstraps, the others join it), each with its
own LoRA policy started from `adapter` (an earlier stage's adapter; omitted: a fresh LoRA). The
adapter of peer 0 is registered under `as`. The report shows every peer's reward per round, the
records exchanged and rejected, and greedy accuracy before and after on evaluation seeds.
Optional: difficulty, local, external, num_generations, learning_rate, temperature, max_new_tokens, eval_n, seed.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from qwenlab.errors import QwenlabError


def _accuracy(base: str, adapter: str | None, task: str, n: int, difficulty) -> float:
    from qwenlab.adapters import active_adapters, attach_adapter
    from qwenlab.bench.task_eval import evaluate_tasks
    from qwenlab.cli.model_commands import load_for_generation

    model, tokenizer, _ = load_for_generation(base, "fp32")
    if adapter:
        attach_adapter(model, adapter, "candidate")  # (a name like "eval" would clash with nn.Module attributes)
    with active_adapters(model, "candidate" if adapter else None):
        return evaluate_tasks(model, tokenizer, [task], n=n, seed=0, difficulty=difficulty, progress=False)[task].accuracy


def _plot(rows_per_peer: list[list[dict]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=110)
    for index, rows in enumerate(rows_per_peer):
        ax.plot([r["round"] for r in rows], [r["local_reward"] for r in rows], marker=".", label=f"peer {index}")
    ax.set_xlabel("round")
    ax.set_ylabel("mean reward of own rollouts")
    ax.set_title("swarm GRPO: reward per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def run(ctx, params: dict) -> tuple[dict, str]:
    from qwenlab.swarm import PeerConfig
    from qwenlab.swarm.local import run_local_swarm
    from qwenlab.train.grpo import GRPOConfig

    task, name = params.get("task", "arithmetic"), params.get("as")
    if not name:
        raise QwenlabError("swarm stage: 'as' (the name of the resulting adapter) is required")
    peers, rounds = int(params.get("peers", 2)), int(params.get("rounds", 6))
    if peers < 1 or rounds < 1:
        raise QwenlabError("swarm stage: 'peers' and 'rounds' must be >= 1")
    base = ctx.model_path(params.get("base", "nano"))
    init = ctx.model_path(params["adapter"]) if params.get("adapter") else None
    difficulty, eval_n, seed = params.get("difficulty"), int(params.get("eval_n", 100)), int(params.get("seed", 0))
    folder = ctx.run_dir / "swarm" / name
    shutil.rmtree(folder, ignore_errors=True)
    configs, swarm_name = [], f"recipe-{time.time_ns()}"  # one name for all peers, new for every run
    for index in range(peers):
        grpo = GRPOConfig(model=base, tasks=[task], difficulty=difficulty, init_adapter=init,
                          num_generations=int(params.get("num_generations", 8)),
                          learning_rate=float(params.get("learning_rate", 1e-3)),
                          temperature=float(params.get("temperature", 1.0)),
                          max_new_tokens=int(params.get("max_new_tokens", 8)), seed=seed * 1000 + index)
        configs.append(PeerConfig(grpo=grpo, out=str(folder / f"peer{index}"), swarm=swarm_name,
                                  network=peers > 1, host="127.0.0.1", local=int(params.get("local", 4)),
                                  external=int(params.get("external", 4)) if peers > 1 else 0, rounds=rounds,
                                  save_every=rounds, resume=False, quiet=True))
    before = _accuracy(base, init, task, eval_n, difficulty)
    started = time.time()
    codes = run_local_swarm(configs, timeout_s=float(params.get("timeout_s", 300)))
    swarm_s = time.time() - started
    if codes[0] != 0 or not (folder / "peer0" / "adapter").is_dir():
        raise QwenlabError(f"swarm stage: peer 0 failed (exit codes {codes}); see {folder}")
    out = ctx.new_model_dir(name)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder / "peer0" / "adapter", out)
    after = _accuracy(base, str(out), task, eval_n, difficulty)
    rows = [[json.loads(line) for line in (folder / f"peer{i}" / "rounds.jsonl").read_text().splitlines()]
            for i in range(peers) if (folder / f"peer{i}" / "rounds.jsonl").is_file()]
    _plot(rows, folder / "rewards.png")
    figures = {
        "task": task, "peers": peers, "rounds": rounds, "swarm_s": round(swarm_s, 1), "exit_codes": codes,
        "accuracy_before": round(before, 4), "accuracy_after": round(after, 4),
        "reward_first_round": [r[0]["local_reward"] for r in rows],
        "reward_last_round": [r[-1]["local_reward"] for r in rows],
        "records_accepted": sum(x["accepted"] for r in rows for x in r),
        "records_rejected": sum(x["rejected"] for r in rows for x in r),
        "external_used": sum(x["external_used"] for r in rows for x in r),
    }
    print(f"  swarm: {peers} peers x {rounds} rounds in {swarm_s:.0f} s; {task} accuracy {before:.3f} -> {after:.3f}")
    start_from = f"adapter `{params['adapter']}`" if init else "a fresh LoRA"
    section = (f"## Swarm GRPO: {name}\n\n{peers} peers on loopback (hivemind DHT), {rounds} rounds each, starting "
               f"from {start_from}; every peer re-scored the {figures['records_accepted']} records it accepted "
               f"with its own verifier ({figures['records_rejected']} rejected, {figures['external_used']} external "
               f"rollout groups trained on). {swarm_s:.0f} s.\n\n"
               f"| {task} (greedy, n={eval_n}, eval seeds) | accuracy |\n|---|---:|\n"
               f"| before ({start_from}) | {before:.3f} |\n| after (peer 0's adapter) | {after:.3f} |\n\n"
               f"![reward per round](swarm/{name}/rewards.png)")
    return figures, section
