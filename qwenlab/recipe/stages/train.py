"""Stage `train`: a LoRA adapter (SFT or DPO) on data built from one verifiable task.

    - train: {kind: sft, base: nano, task: arithmetic, n: 400, steps: 60, as: sft-arithmetic}

Optional: seed, difficulty, lora_r, lora_alpha, lora_dropout, learning_rate, batch_size, beta,
dpo_loss, target_modules, max_length, threads, val_fraction; for SFT, `replay: 0.25` mixes in that share
of the base's own answers to the other tasks' prompts (replay_tasks: which tasks); for DPO, `rejected_from: MODEL` takes
rejected answers from that model's own wrong replies (on-policy pairs). The adapter is
registered under `as` (ctx.model_path) and its loss curve is linked in the report.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from qwenlab.recipe.stages.params import StageParams, TaskSpelling, named_output

OPTIONAL = ("lora_r", "lora_alpha", "lora_dropout", "learning_rate", "batch_size", "beta", "dpo_loss",
            "target_modules", "max_length", "threads", "replay", "replay_tasks", "replay_answers", "engine", "dtype",
            "early_stopping", "eval_steps")


class Params(StageParams):
    MODEL_FIELDS = ("base", "rejected_from")
    kind: Literal["sft", "dpo"] = "sft"
    task: TaskSpelling
    as_: str = named_output()
    base: str = "nano"
    n: PositiveInt = 400
    steps: PositiveInt = 60
    seed: NonNegativeInt = 0
    difficulty: PositiveInt | None = None
    rejected_from: str | None = None
    val_fraction: float = Field(0.05, ge=0, lt=1)
    # passed to TrainConfig as given (it validates them): the LoRA and optimiser settings
    lora_r: PositiveInt | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    learning_rate: float | None = None
    batch_size: PositiveInt | None = None
    beta: float | None = None
    dpo_loss: list[str] | None = None
    target_modules: list[str] | str | None = None
    max_length: PositiveInt | None = None
    threads: PositiveInt | None = None
    # SFT: a share of the base's own answers to the other tasks' prompts (train/replay.py), so the
    # specialist keeps the base's other skills; replay_tasks defaults to every built-in task but this one.
    replay: float | None = Field(None, ge=0, lt=1)
    replay_tasks: list[str] | None = None
    replay_answers: Literal["base", "reference"] | None = None  # reference: rehearse the tasks' own answers
    engine: Literal["trl", "native"] | None = None  # native: SFT on qwenlab's own loop (docs/adapters.md)
    dtype: Literal["fp32", "bf16"] | None = None
    # stop after this many evaluations (every eval_steps) without a lower eval loss; keep the best adapter
    early_stopping: PositiveInt | None = None
    eval_steps: PositiveInt | None = None

    @model_validator(mode="after")
    def _early_stopping_needs_evaluations(self):
        if self.early_stopping and not self.eval_steps:
            raise ValueError("early_stopping needs eval_steps (how often the eval loss is measured)")
        return self

    def outputs(self) -> list[str]:
        return [self.as_]


def run(ctx, params: Params) -> tuple[dict, str]:
    from qwenlab.train import TrainConfig, train_dpo, train_sft
    from qwenlab.train.data import dpo_records_from_task, sft_records_from_task, write_jsonl

    kind, task, name = params.kind, params.task, params.as_
    n, steps, seed = params.n, params.steps, params.seed
    if kind == "sft":
        records = sft_records_from_task(task, n, seed=seed, difficulty=params.difficulty)
    else:
        policy = params.rejected_from
        records = dpo_records_from_task(task, n, seed=seed, difficulty=params.difficulty,
                                        rejected_from=ctx.model_path(policy) if policy else None)
    out = ctx.new_model_dir(name, "train stage: as")  # checked first: the name becomes folder names
    data = write_jsonl(records, ctx.run_dir / "data" / f"{name}.jsonl", force=True)
    options = {k: getattr(params, k) for k in OPTIONAL if getattr(params, k) is not None}
    if params.replay and params.replay_tasks is None:
        from qwenlab.tasks.registry import TASKS

        options["replay_tasks"] = [t for t in TASKS if t != task]
    config = TrainConfig(base=ctx.model_path(params.base), data=str(data), out=str(out), steps=steps,
                         seed=seed, save_total_limit=1,
                         # a checkpoint at every evaluation with early stopping, so the best one can be kept
                         save_steps=params.eval_steps if params.early_stopping else 0,
                         logging_steps=max(1, steps // 20),
                         val_fraction=params.val_fraction, force=True, **options)
    result = (train_sft if kind == "sft" else train_dpo)(config)
    figures = {"kind": kind, "task": task, "difficulty": params.difficulty, "n": n, "steps": result.steps,
               "learning_rate": config.learning_rate_for(kind), "train_loss": result.train_loss,
               "eval_loss": result.eval_loss, "train_s": round(result.runtime_s, 1),
               "tokens_per_s": round(result.tokens_per_s, 1) if result.tokens_per_s else None}
    eval_text = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    section = (f"## Adapter {name}: LoRA {kind.upper()} on {task}\n\n"
               f"{n} examples from task seeds disjoint from evaluation, {result.steps} steps in "
               f"{result.runtime_s:.0f} s; mean train loss {result.train_loss:.4f}{eval_text}.\n\n"
               f"![loss curve of {name}](models/{name}/loss_curve.png)")
    return figures, section
