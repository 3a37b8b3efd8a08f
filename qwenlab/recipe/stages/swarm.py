"""Stage `swarm`: a short local SAPO swarm (GRPO peers sharing rollouts over hivemind) on one or more tasks.

    - swarm: {base: nano, adapter: sft-arithmetic, task: arithmetic, peers: 2, rounds: 100, as: swarm-arithmetic}
    - swarm: {base: nano, tasks: [arithmetic, "reasoning_gym:chain_sum@chain_sum.yaml"], as: swarm-mixed}

`task` (one) or `tasks` (a list), in any task spelling (docs/tasks.md); not both. With several tasks,
each round's local groups are one question each of different tasks (SAPO's multi-task rounds), and
accuracy is the mean over the tasks (each task's own is in the figures).

Peers run as separate processes on loopback (peer 0 bootstraps, the others join it), each with its
own LoRA policy started from `adapter` (an earlier stage's adapter; omitted: a fresh LoRA). Every
`select_every` rounds each peer keeps a snapshot of its adapter; afterwards every snapshot, and the
starting adapter, is scored on validation instances (evaluation seed 1), and the best is registered
under `as` (early stopping, as TRL's load_best_model_at_end does; one GRPO run's accuracy wanders
by a few points between rounds). Before/after accuracy is measured on other instances (evaluation
seed 0, the adapter_eval stage's), so the choice does not inflate the figure reported.
The report shows every peer's reward per round, its validation accuracy per snapshot, the records
exchanged and rejected, and the before/after table.
Optional: difficulty, local, external, num_generations, learning_rate, temperature, max_new_tokens,
eval_n, select_every (0: keep peer 0's final adapter, no selection), seed, timeout_s.

`control: true` also runs the solo control: one peer alone (no shared rollouts) with the same local
rollouts per round, rounds, start and seed as peer 0, its snapshot chosen on validation the same way.
The report then says whether the swarm beat it, from a paired test on the same test instances: only
when the 95% interval of the difference lies above zero.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from qwenlab.errors import QwenlabError
from qwenlab.recipe.stages.params import StageParams, TaskSpelling, named_output
from qwenlab.stats import paired_comparison


class Params(StageParams):
    MODEL_FIELDS = ("base", "adapter")
    as_: str = named_output()
    task: TaskSpelling | None = None  # one task (default: arithmetic) ...
    tasks: list[TaskSpelling] | None = Field(default=None, min_length=1)  # ... or several, not both
    base: str = "nano"
    adapter: str | None = None  # the LoRA the peers start from (default: a fresh one)
    peers: PositiveInt = 2
    rounds: PositiveInt = 6
    local: NonNegativeInt = 4  # rollouts per round from the peer's own tasks
    external: NonNegativeInt = 4  # rollouts per round sampled from other peers
    difficulty: PositiveInt | None = None
    eval_n: PositiveInt = 100
    seed: NonNegativeInt = 0
    select_every: NonNegativeInt = 25  # snapshot interval (rounds) for choosing the best adapter; 0: none
    num_generations: PositiveInt = 8
    learning_rate: PositiveFloat = 1e-3
    temperature: PositiveFloat = 1.0
    max_new_tokens: PositiveInt = 8
    timeout_s: PositiveFloat = 300
    control: bool = False  # also run solo GRPO with the same local rollouts, and compare (paired test)

    def outputs(self) -> list[str]:
        return [self.as_]

    @model_validator(mode="after")
    def _one_spelling(self):
        if self.task is not None and self.tasks is not None:
            raise ValueError("give 'task' or 'tasks', not both")
        if self.tasks is not None and len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"'tasks' names a task twice: {self.tasks}")
        return self

    def task_list(self) -> list[str]:
        return list(self.tasks) if self.tasks is not None else [self.task or "arithmetic"]


VALIDATION_SEED, TEST_SEED = 1, 0  # evaluation seeds: snapshots are chosen on 1, reported on 0


def _accuracy(base: str, adapters: list[str | None], tasks: list[str], n: int, difficulty, seed: int,
              per_task: list | None = None, rewards: list | None = None) -> list[float]:
    """Greedy accuracy (mean over tasks) of the base with each adapter (None: the base alone), loading the
    base once; per_task, when given, receives each adapter's {task: accuracy}, and rewards its per-instance
    rewards (the tasks' in order: the same instances for every adapter, so they pair up)."""
    from qwenlab.adapters import active_adapters, attach_adapter, detach_adapter
    from qwenlab.eval.task_eval import evaluate_tasks
    from qwenlab.loading import load

    model, tokenizer, _ = load(base, "fp32")
    scores = []
    for adapter in adapters:
        if adapter:
            attach_adapter(model, adapter, "candidate")  # (a name like "eval" would clash with nn.Module attributes)
        with active_adapters(model, "candidate" if adapter else None):
            result = evaluate_tasks(model, tokenizer, tasks, n=n, seed=seed, difficulty=difficulty, progress=False)
        scores.append(sum(result[t].accuracy for t in tasks) / len(tasks))
        if per_task is not None:
            per_task.append({t: round(result[t].accuracy, 4) for t in tasks})
        if rewards is not None:
            rewards.append([r for t in tasks for r in result[t].rewards])
        if adapter:
            detach_adapter(model, "candidate")
    return scores


def _plot(rows_per_peer: list[list[dict]], validation: dict[int, list[tuple[int, float]]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 3.6), dpi=110)
    for index, rows in enumerate(rows_per_peer):
        left.plot([r["round"] for r in rows], [r["local_reward"] for r in rows], marker=".", label=f"peer {index}")
    left.set_xlabel("round")
    left.set_ylabel("mean reward of own rollouts")
    left.set_title("swarm GRPO: reward per round")
    for index, points in sorted(validation.items()):
        right.plot([r for r, _ in points], [a for _, a in points], marker="o", label=f"peer {index}")
    right.set_xlabel("round")
    right.set_ylabel("greedy accuracy (validation seeds)")
    right.set_title("snapshots on validation")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def _train_peers(params: Params, base: Path, init: Path | None, tasks: list[str], folder: Path, peers: int,
                 swarm_name: str) -> list[int]:
    """Run `peers` GRPO peers into folder/peer<i> (one peer: solo, no network, no external rollouts);
    their exit codes. Peer 0 must finish. The folder is emptied first (an earlier stage's peers of the same
    name, in this run)."""
    from qwenlab.checkpoint.writer import prepare_output_dir, remove_path
    from qwenlab.swarm import PeerConfig
    from qwenlab.swarm.local import run_local_swarm
    from qwenlab.train.grpo import GRPOConfig

    prepare_output_dir(folder, True, [init, base])
    remove_path(folder)
    configs = []
    for index in range(peers):
        grpo = GRPOConfig(model=base, tasks=tasks, difficulty=params.difficulty, init_adapter=init,
                          num_generations=params.num_generations, learning_rate=params.learning_rate,
                          temperature=params.temperature, max_new_tokens=params.max_new_tokens,
                          seed=params.seed * 1000 + index)
        configs.append(PeerConfig(grpo=grpo, out=str(folder / f"peer{index}"), swarm=swarm_name,
                                  network=peers > 1, host="127.0.0.1", local=params.local,
                                  external=params.external if peers > 1 else 0, rounds=params.rounds,
                                  save_every=params.rounds, snapshot_every=params.select_every, resume=False,
                                  quiet=True))
    codes = run_local_swarm(configs, timeout_s=params.timeout_s)
    if codes[0] != 0 or not (folder / "peer0" / "adapter").is_dir():
        raise QwenlabError(f"swarm stage: peer 0 failed (exit codes {codes}); see {folder}")
    return codes


def _choose(base: Path, init: Path | None, tasks: list[str], folder: Path, peers: int, params: Params):
    """(candidates, their validation accuracies, the index of the best). Candidates: the starting adapter
    (round 0; a fresh LoRA is the base itself, so not a candidate) and every snapshot of every peer that
    finished, as (peer or None, round, path)."""
    candidates: list[tuple[int | None, int, str | None]] = [(None, 0, init)] if init else []
    if params.select_every:
        for index in range(peers):
            for snap in sorted((folder / f"peer{index}" / "snapshots").glob("round-*")):
                candidates.append((index, int(snap.name.split("-")[1]), str(snap)))
    else:
        candidates.append((0, params.rounds, str(folder / "peer0" / "adapter")))
    scores = _accuracy(base, [c[2] for c in candidates], tasks, params.eval_n, params.difficulty, VALIDATION_SEED)
    best = max(range(len(candidates)), key=lambda i: (scores[i], -i))  # ties: the earliest candidate
    return candidates, scores, best


def run(ctx, params: Params) -> tuple[dict, str]:
    from qwenlab.checkpoint.writer import atomic_folder, prepare_output_dir
    from qwenlab.recipe.context import check_name

    tasks, name = params.task_list(), params.as_
    task = ", ".join(tasks)  # for the report
    check_name(name, "swarm stage: as")  # it names folders: models/NAME and swarm/NAME
    peers, rounds = params.peers, params.rounds
    base = ctx.model_path(params.base)
    init = ctx.model_path(params.adapter) if params.adapter else None
    difficulty, eval_n, select_every = params.difficulty, params.eval_n, params.select_every
    # Checked now, not after the swarm ran: the result may not replace its own starting adapter or base.
    out = prepare_output_dir(ctx.model_dir(name, "swarm stage: as"), True, [init, base])
    folder = ctx.run_dir / "swarm" / name
    started = time.time()
    codes = _train_peers(params, base, init, tasks, folder, peers, f"recipe-{time.time_ns()}")
    swarm_s = time.time() - started
    candidates, scores, best = _choose(base, init, tasks, folder, peers, params)
    chosen_peer, chosen_round, chosen = candidates[best]
    control = None
    if params.control:
        solo = ctx.run_dir / "swarm" / f"{name}-solo"
        started = time.time()
        _train_peers(params, base, init, tasks, solo, 1, f"recipe-solo-{time.time_ns()}")
        solo_s = time.time() - started
        solo_candidates, solo_scores, solo_best = _choose(base, init, tasks, solo, 1, params)
        control = (solo_candidates[solo_best], solo_scores[solo_best], solo_s)
    per_task: list[dict] = []
    rewards: list[list[float]] = []
    tested = [init, chosen] + ([control[0][2]] if control else [])
    before, after, *solo_after = _accuracy(base, tested, tasks, eval_n, difficulty, TEST_SEED, per_task, rewards)
    out = ctx.new_model_dir(name, "swarm stage: as")
    with atomic_folder(out, True, [init, base]) as tmp:  # the old adapter stays until the new one is complete
        shutil.copytree(chosen, tmp, dirs_exist_ok=True)
        if not (tmp / "tokenizer_config.json").exists():  # snapshots hold the adapter files only
            for extra in (folder / "peer0" / "adapter").iterdir():
                if extra.is_file() and not (tmp / extra.name).exists():
                    shutil.copy2(extra, tmp / extra.name)
    rows = [[json.loads(line) for line in (folder / f"peer{i}" / "rounds.jsonl").read_text().splitlines()]
            for i in range(peers) if (folder / f"peer{i}" / "rounds.jsonl").is_file()]
    validation: dict[int, list[tuple[int, float]]] = {}
    for (peer, round_, _), score in zip(candidates, scores):
        for index in (range(peers) if peer is None else [peer]):
            validation.setdefault(index, []).append((round_, score))
    _plot(rows, validation, folder / "rewards.png")
    picked = "the starting adapter" if chosen_peer is None else f"peer {chosen_peer}'s adapter at round {chosen_round}"
    figures = {
        "task": task, "tasks": tasks, "peers": peers, "rounds": rounds, "swarm_s": round(swarm_s, 1), "exit_codes": codes,
        "accuracy_before": round(before, 4), "accuracy_after": round(after, 4),
        "accuracy_per_task": {"before": per_task[0], "after": per_task[1]},
        "chosen": {"peer": chosen_peer, "round": chosen_round, "validation_accuracy": round(scores[best], 4)},
        "validation": {str(k): v for k, v in validation.items()},
        "reward_first_round": [r[0]["local_reward"] for r in rows],
        "reward_last_round": [r[-1]["local_reward"] for r in rows],
        "records_accepted": sum(x["accepted"] for r in rows for x in r),
        "records_rejected": sum(x["rejected"] for r in rows for x in r),
        "external_used": sum(x["external_used"] for r in rows for x in r),
    }
    print(f"  swarm: {peers} peers x {rounds} rounds in {swarm_s:.0f} s; chose {picked} on validation; "
          f"{task} accuracy {before:.3f} -> {after:.3f}")
    verdict = ""
    if control:
        (_, solo_round, _), solo_validation, solo_s = control
        test = paired_comparison(rewards[2], rewards[1])  # swarm against solo, on the same test instances
        beat = test.low > 0 and test.significant()
        figures["control"] = {"solo_s": round(solo_s, 1), "solo_round": solo_round,
                              "solo_validation_accuracy": round(solo_validation, 4),
                              "solo_accuracy": round(solo_after[0], 4), "per_task": per_task[2],
                              "difference": round(test.difference, 4), "ci95": [round(test.low, 4), round(test.high, 4)],
                              "p_value": test.p_value, "swarm_beat_solo": beat}
        verdict = (f"\n\n**Against solo GRPO** (one peer, no shared rollouts, the same {params.local} local rollout "
                   f"groups per round for {rounds} rounds, the same start and seed as peer 0; its snapshot at round "
                   f"{solo_round} chosen on validation the same way, {solo_s:.0f} s): solo {solo_after[0]:.3f}, swarm "
                   f"{after:.3f}. " + test.describe("solo", "swarm") + ". " +
                   ("The swarm beat solo GRPO: the whole interval lies above zero." if beat else
                    "The swarm did not beat solo GRPO here: the interval of the difference includes zero "
                    "or lies below it."))
        print(f"  swarm vs solo: {test.describe('solo', 'swarm')}")
    start_from = f"adapter `{params.adapter}`" if init else "a fresh LoRA"
    curve = " | ".join(f"peer {k}: " + ", ".join(f"r{r} {a:.3f}" for r, a in v) for k, v in sorted(validation.items()))
    section = (f"## Swarm GRPO: {name}\n\n{peers} peers on loopback (hivemind DHT), {rounds} rounds each, starting "
               f"from {start_from}; every peer re-scored the {figures['records_accepted']} records it accepted "
               f"with its own verifier ({figures['records_rejected']} rejected, {figures['external_used']} external "
               f"rollout groups trained on). {swarm_s:.0f} s.\n\n"
               f"Snapshots every {select_every or rounds} rounds, greedy accuracy on validation instances "
               f"(evaluation seed {VALIDATION_SEED}, n={eval_n}): {curve}. Registered as `{name}`: {picked}.\n\n"
               f"| {task} (greedy, n={eval_n}, evaluation seed {TEST_SEED}) | accuracy |\n|---|---:|\n"
               f"| before ({start_from}) | {before:.3f} |\n| after ({picked}) | {after:.3f} |"
               + (f"\n| solo control (its round {control[0][1]}) | {solo_after[0]:.3f} |" if control else "")
               + verdict + f"\n\n![reward per round and validation accuracy](swarm/{name}/rewards.png)")
    return figures, section
