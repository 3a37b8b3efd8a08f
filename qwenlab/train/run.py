"""What SFT and DPO runs share: checking inputs, the base model, LoRA and Trainer settings, the output.

A run folder:
    OUT/adapter_config.json, adapter_model.safetensors   the final adapter, PEFT format (written last)
    OUT/tokenizer files, lineage.json, loss_curve.png, training_log.json
    OUT/checkpoints/checkpoint-N/   adapter + optimizer, scheduler, RNG and trainer state (for --resume)
Every input is checked before anything is written, so bad input leaves nothing behind. A new run
trains in the sibling OUT.partial (its checkpoints are what --resume continues) and is renamed to
OUT only when the final adapter is complete; with --force an old OUT stays until then. So OUT is
always a finished run or absent, and an interrupted one is the clearly named OUT.partial.
"""

from __future__ import annotations

import json
import math
import os
import sys
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenlab.errors import QwenlabError
from qwenlab.train.config import TrainConfig
from qwenlab.train.data import assistant_only_turns, load_jsonl, split_records

CHECKPOINTS = "checkpoints"
SMALL_RUN_STEPS = 25  # fewer optimizer steps than this, from the data's size: say so and suggest settings
RUN_CONFIG = "run_config.json"
OPTIONS = "options.json"  # every option of the run, so `--resume --out OUT` needs nothing else
NOT_RESUMED = ("out", "resume", "resume_from", "force")
# Settings a resumed run must share with the run it continues.
RESUME_KEYS = ("base", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "rslora", "batch_size", "grad_accum",
               "learning_rate", "scheduler", "warmup", "weight_decay", "max_length", "beta", "dtype", "seed",
               "val_fraction", "eval_data", "total_steps", "data_sha256", "kind", "replay", "replay_prompts",
               "replay_tasks", "replay_answers", "engine")


@dataclass
class TrainingRun:
    kind: str  # sft | dpo
    config: TrainConfig
    base: Path
    out: Path
    train_records: list[dict]
    eval_records: list[dict]
    conversational: bool
    total_steps: int
    resume_from: str | None = None
    work: Path | None = None  # where the run writes until it is complete (OUT.partial, or OUT when resumed in place)

    @property
    def checkpoints(self) -> Path:
        return (self.work or self.out) / CHECKPOINTS


@dataclass
class TrainResult:
    out: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    runtime_s: float
    tokens_seen: int | None
    log_history: list[dict] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens_seen / self.runtime_s if self.tokens_seen and self.runtime_s else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QwenlabError(f"{path}: not valid JSON ({e}); the checkpoint is damaged: resume from an "
                           "earlier checkpoint-N with --resume-from, or start again with --force") from None
    if not isinstance(data, dict):
        raise QwenlabError(f"{path}: expected a JSON object; the checkpoint is damaged")
    return data


def with_saved_options(config: TrainConfig) -> TrainConfig:
    """`--resume` with only `--out`: every option the interrupted run used, from its checkpoints/, except
    those given now (a field still at its default counts as not given)."""
    from dataclasses import MISSING, fields, replace

    out = Path(config.out) if config.out else None
    found = [folder / CHECKPOINTS / OPTIONS for folder in (partial_folder(out), out) if out] if out else []
    saved_path = next((p for p in found if p.is_file()), None)
    if saved_path is None:
        raise QwenlabError(f"--resume: no earlier run in {config.out or '(no --out)'} to take its settings from; "
                           "give --out of an interrupted run, or --data and --base")
    saved = _read_json(saved_path)
    changes = {}
    for f in fields(TrainConfig):
        if f.default is MISSING and f.default_factory is MISSING:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.name in saved and f.name not in NOT_RESUMED and getattr(config, f.name) == default:
            changes[f.name] = saved[f.name]
    return replace(config, **changes)


def prepare_run(config: TrainConfig, kind: str) -> TrainingRun:
    """Check everything (base, data, chat template, output folder, resume state); writes nothing."""
    from qwenlab.checkpoint import open_checkpoint
    from qwenlab.model.tokenizer import load_tokenizer

    if (config.resume or config.resume_from) and not config.data:
        config = with_saved_options(config)
    config.validate()
    base = open_checkpoint(config.base).path.resolve()
    records, conversational = load_jsonl(config.data, kind)
    if config.eval_data:
        eval_records, eval_conversational = load_jsonl(config.eval_data, kind)
        if eval_conversational != conversational:
            raise QwenlabError(f"{config.eval_data}: chat/plain-text format differs from {config.data}")
        train_records = records
    else:
        train_records, eval_records = split_records(records, config.val_fraction, config.seed)
    # split first, then expand: the turns of one conversation never straddle train and validation
    train_records, eval_records = assistant_only_turns(train_records), assistant_only_turns(eval_records)
    tokenizer = load_tokenizer(base)  # fails with one line if the base has no tokenizer.json
    if conversational and not tokenizer.chat_template:
        raise QwenlabError(f"{base}: the tokenizer has no chat template, which the chat-format data in "
                           f"{config.data} needs (add 'chat_template' to tokenizer_config.json)")
    if config.replay and kind == "sft":
        # With early stopping on a split of the data, the split gets its share of replay too: the eval loss then
        # watches the other skills as well as the new one (the training replay rows are the same either way).
        held_out = eval_records if config.early_stopping and not config.eval_data else []
        train_records, replayed_eval = with_replay(config, base, train_records, conversational, held_out)
        eval_records = replayed_eval if held_out else eval_records
    per_step = config.batch_size * config.grad_accum
    total_steps = config.steps or max(1, math.ceil(math.ceil(len(train_records) / per_step) * config.epochs))
    if total_steps < SMALL_RUN_STEPS and not config.steps:
        print(f"note: {len(train_records)} training examples make only {total_steps} optimizer step(s) "
              f"(batch {config.batch_size} x accumulation {config.grad_accum}, {config.epochs:g} epoch(s)); "
              f"an adapter learns little from so few. Add data, or set --steps (e.g. {SMALL_RUN_STEPS * 4}) "
              "and a higher --learning-rate (e.g. 1e-3 for a few hundred examples).", file=sys.stderr)
    run = TrainingRun(kind, config, base, Path(config.out), train_records, eval_records, conversational, total_steps)
    _prepare_output(run)
    return run


def with_replay(config: TrainConfig, base: Path, train_records: list[dict], conversational: bool,
                held_out: list[dict] = ()) -> tuple[list[dict], list[dict]]:
    """The training records and the `held_out` ones, each with its share of replay mixed in (train/replay.py;
    chat data only); the held-out replay is drawn after the training one."""
    from qwenlab.train import replay

    if not conversational:
        raise QwenlabError(f"{config.data}: replay needs chat-format data (messages or prompt/completion "
                           "messages); this file is plain text")
    count = replay.replay_count(len(train_records), config.replay)
    total = count + replay.replay_count(len(held_out), config.replay)
    if config.replay_answers == "reference":  # rehearsal: the data's own answers
        records = (replay.file_reference_records(config.replay_prompts, total, config.seed) if config.replay_prompts
                   else replay.task_reference_records(config.replay_tasks, total, config.seed))
        whose = "reference answers"
    else:
        prompts = (replay.file_prompts(config.replay_prompts, total, config.seed) if config.replay_prompts
                   else replay.task_prompts(config.replay_tasks, total, config.seed))
        records = replay.replay_records(base, prompts, progress=config.progress)
        whose = "answers of the base"
    records, for_eval = records[:count], records[count:]
    print(f"replay: {len(records)} {whose} mixed into {len(train_records)} training examples"
          + (f", {len(for_eval)} into the {len(held_out)} held out" if for_eval else ""), file=sys.stderr)
    return (replay.mix(train_records, records, config.seed),
            replay.mix(list(held_out), for_eval, config.seed) if for_eval else list(held_out))


def _run_settings(run: TrainingRun) -> dict:
    from qwenlab.checkpoint.lineage import file_sha256

    settings = {k: v for k, v in run.config.as_dict().items() if k in RESUME_KEYS}
    settings.update(kind=run.kind, base=str(run.base), total_steps=run.total_steps,
                    learning_rate=run.config.learning_rate_for(run.kind),
                    data_sha256=file_sha256(Path(run.config.data)))
    return settings


def say_interrupted(run: TrainingRun, step: int, saved: str) -> None:
    """Ctrl-C's last line, whichever engine ran: where training stopped and the command that continues it."""
    print(f"\ntrain: interrupted at step {step} ({saved}); resume with: qwenlab train {run.kind} --out {run.out} "
          "--resume", file=sys.stderr, flush=True)


def partial_folder(out: Path) -> Path:
    """Where a run trains until it is complete."""
    return out.with_name(out.name + ".partial")


def _prepare_output(run: TrainingRun) -> None:
    from transformers.trainer_utils import get_last_checkpoint

    from qwenlab.checkpoint.writer import prepare_output_dir

    config, out = run.config, run.out
    settings = _run_settings(run)
    partial = partial_folder(out)
    inputs = [run.base, config.data, config.eval_data]
    if config.resume or config.resume_from:
        # an interrupted run's work folder first; else OUT itself if it has checkpoints (a finished run,
        # or one laid out by hand); else (--resume-from elsewhere) a new OUT.partial
        in_place = (out / CHECKPOINTS).is_dir() and not (partial / CHECKPOINTS).is_dir()
        run.work = out if in_place else partial
        for folder in {out, run.work}:
            prepare_output_dir(folder, True, inputs)  # even resumed, OUT is replaced at the end: never an input
        checkpoint = config.resume_from
        if not checkpoint and run.checkpoints.is_dir():
            checkpoint = get_last_checkpoint(str(run.checkpoints))
        if not checkpoint or not Path(checkpoint, "trainer_state.json").is_file():
            raise QwenlabError(f"{config.resume_from or run.checkpoints}: no checkpoint-N folder to resume from")
        _read_json(Path(checkpoint, "trainer_state.json"))  # corrupt: one line now, not transformers' trace later
        saved_path = Path(checkpoint).parent / RUN_CONFIG
        saved = _read_json(saved_path) if saved_path.is_file() else {}
        for key, value in settings.items():
            if key in saved and saved[key] != value:
                raise QwenlabError(f"--resume: '{key}' was {saved[key]!r} in the interrupted run and is {value!r} "
                                   "now; resume with the same settings and data")
        run.resume_from = str(checkpoint)
        print(f"resuming from {checkpoint}", file=sys.stderr, flush=True)
        return
    if (out.exists() or out.is_symlink()) and not config.force:
        raise QwenlabError(f"{out}: output folder exists (use --resume to continue it, or --force to replace it)")
    if partial.exists() and not config.force:
        raise QwenlabError(f"{partial}: an interrupted run of this output (use --resume to continue it, "
                           "or --force to start again)")
    prepare_output_dir(out, config.force, inputs)
    prepare_output_dir(partial, config.force, inputs)
    run.work = partial


def open_output(run: TrainingRun) -> None:
    """Create the work folder's checkpoints/ once every input has been checked. A new run starts from
    an empty OUT.partial (an interrupted one of the same OUT is replaced with --force); OUT is untouched."""
    from qwenlab.checkpoint.writer import remove_path

    if not run.resume_from and run.work is not None and run.work != run.out:
        remove_path(run.work)
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    (run.checkpoints / RUN_CONFIG).write_text(json.dumps(_run_settings(run), indent=2) + "\n")
    (run.checkpoints / OPTIONS).write_text(json.dumps(run.config.as_dict(), indent=2, default=str) + "\n")


def load_training_model(run: TrainingRun):
    """The base as a transformers model in fp32 (weights stored in bf16 are upcast) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if run.config.threads:
        torch.set_num_threads(run.config.threads)
    model = AutoModelForCausalLM.from_pretrained(str(run.base), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(run.base))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def lora_config(config: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), use_rslora=config.rslora, bias="none",
                      task_type="CAUSAL_LM")


def trainer_arguments(run: TrainingRun) -> dict:
    """Keyword arguments shared by SFTConfig and DPOConfig: CPU-safe, checkpointed, resumable."""
    config = run.config
    bf16 = config.dtype in ("bf16", "bfloat16")
    save_steps = config.save_steps or run.total_steps  # a final checkpoint is always written
    evaluate = bool(run.eval_records)
    return dict(
        output_dir=str(run.checkpoints),
        max_steps=run.total_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate_for(run.kind),
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup,
        weight_decay=config.weight_decay,
        max_length=config.max_length,
        # Explicit precision: TRL defaults bf16=True, and fp16 has no CPU kernels worth using.
        bf16=bf16,
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        # transformers 5's name for gradient checkpointing; TRL turns it on by default, too slow for small CPU runs.
        activation_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=config.save_total_limit or None,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=(config.eval_steps or save_steps) if evaluate else None,
        # early stopping (transformers' EarlyStoppingCallback, added in trainers.py) keeps the best checkpoint
        **(dict(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
           if config.early_stopping and evaluate else {}),
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=not config.progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )


def datasets(run: TrainingRun):
    """The train and eval sets as TRL datasets. Chats are left to TRL's rendering: rendering them to
    stop at <|im_end|> (no loss on the template's newline after it) was measured and not adopted
    (nano arithmetic SFT, 100 steps: 0.14 against 0.205 with TRL's rendering, n = 200)."""
    from datasets import Dataset

    train = Dataset.from_list(run.train_records)
    return train, (Dataset.from_list(run.eval_records) if run.eval_records else None)


def finish_run(run: TrainingRun, started: float, history: list[dict], steps: int, tokens: int | None,
               write_adapter) -> TrainResult:
    """Write the final adapter folder (PEFT format) with tokenizer, lineage, loss curve and log.
    `history` is the run's log (transformers' log_history shape); `write_adapter(folder)` writes the PEFT files."""
    from qwenlab.adapters.peft_format import ADAPTER_CONFIG, read_adapter
    from qwenlab.checkpoint.lineage import make_lineage, write_lineage
    from qwenlab.checkpoint.writer import copy_tokenizer_files
    from qwenlab.train.plots import loss_points, plot_loss_curve

    train_points, eval_points = loss_points(history)
    runtime = time.time() - started
    tokens = tokens or None
    # the run's mean training loss (transformers logs it once at the end), not the last logged value
    mean_loss = next((e["train_loss"] for e in reversed(history) if "train_loss" in e), None)
    last_loss = train_points[-1][1] if train_points else None
    # with early stopping, the adapter kept is the best evaluation's, and so is the eval loss reported
    best_eval = next((e["best_eval_loss"] for e in reversed(history) if "best_eval_loss" in e), None)
    result = TrainResult(run.out, steps, mean_loss if mean_loss is not None else last_loss,
                         best_eval if best_eval is not None else eval_points[-1][1] if eval_points else None,
                         runtime, tokens, history)
    from qwenlab.checkpoint.writer import replace_output

    work = run.work or run.out
    tmp = work / f".final.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write_adapter(tmp)
        _name_the_hub_base(tmp / ADAPTER_CONFIG, run.config.base)
        read_adapter(tmp)  # what PEFT wrote must read back in qwenlab
        copy_tokenizer_files(run.base, tmp)
        plot_loss_curve(history, tmp / "loss_curve.png", title=f"LoRA {run.kind.upper()}: {Path(run.config.data).name}")
        summary = {"kind": run.kind, "steps": result.steps, "train_loss": result.train_loss,
                   "eval_loss": result.eval_loss, "runtime_s": round(runtime, 2), "tokens_seen": tokens,
                   "train_records": len(run.train_records), "eval_records": len(run.eval_records),
                   "resumed_from": run.resume_from}
        log = {"summary": summary, "config": run.config.as_dict(), "log_history": history}
        (tmp / "training_log.json").write_text(json.dumps(log, indent=2, default=str) + "\n")
        lineage = make_lineage("adapter", f"lora-{run.kind}", {"base": run.base, "data": run.config.data},
                               {**_run_settings(run), **summary})
        write_lineage(tmp, lineage)
        for file in sorted(tmp.iterdir(), key=lambda p: p.name == ADAPTER_CONFIG):  # config last
            os.replace(file, work / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if work != run.out:
        replace_output(work, run.out)  # complete: now it becomes OUT (an old OUT is removed only after)
    return result


def _name_the_hub_base(config_path: Path, base: str) -> None:
    """A base given by hub id is recorded by that id (and its revision), as PEFT does for hub models,
    not by the snapshot folder it resolved to: the adapter then loads on any machine with that model."""
    from qwenlab.checkpoint.hub import parse_hub_id

    parsed = parse_hub_id(base) if not Path(base).exists() else None
    if parsed is None:
        return
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"], revision = parsed
    if revision:
        config["revision"] = revision
    config_path.write_text(json.dumps(config, indent=2) + "\n")
