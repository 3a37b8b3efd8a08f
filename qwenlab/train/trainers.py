"""LoRA SFT and DPO on TRL's trainers: the base in fp32, a PEFT LoRA, checkpoints, resume, eval loss.

    result = train_sft(load_train_config("sft.yaml"))
    result = train_dpo(load_train_config("dpo.yaml"))

SFT: chat prompt/completion data takes the loss on the completion only; `messages` data on the whole
conversation (TRL's rules). DPO: the policy is base + LoRA, the reference the same base with the
adapter switched off (no second model in memory); data is prompt/chosen/rejected. Everything TRL
does not need to decide is set in run.trainer_arguments. `engine: native` runs SFT or DPO on qwenlab's own
loop instead (train/native/): the same examples, init, batches and steps, with less work per step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
import warnings

from qwenlab.errors import QwenlabError
from qwenlab.train.config import TrainConfig
from qwenlab.train.run import (
    TrainResult,
    datasets,
    finish_run,
    load_training_model,
    lora_config,
    open_output,
    prepare_run,
    say_interrupted,
    trainer_arguments,
)


def _sft_trainer(config: TrainConfig, arguments: dict) -> tuple[type, dict]:
    from trl import SFTConfig, SFTTrainer

    return SFTTrainer, {"args": SFTConfig(**arguments, packing=False)}


def _dpo_trainer(config: TrainConfig, arguments: dict) -> tuple[type, dict]:
    from trl import DPOConfig, DPOTrainer

    # with a PEFT model TRL uses the base (adapter disabled) as the reference
    return DPOTrainer, {"ref_model": None,
                        "args": DPOConfig(**arguments, beta=config.beta, loss_type=list(config.dpo_loss))}


TRAINERS = {"sft": _sft_trainer, "dpo": _dpo_trainer}


def train(config: TrainConfig, kind: str) -> TrainResult:
    """One LoRA training run for `kind` ('sft' or 'dpo'): TRL's trainer, or with `engine: native` qwenlab's own
    loop (train/native/), into the same output folder."""
    if config.engine == "native" and kind == "dpo":  # before anything is read or written
        from qwenlab.train.native.dpo import NATIVE_DPO_LOSSES

        other = [term for term in config.dpo_loss if term not in NATIVE_DPO_LOSSES]
        if other:
            raise QwenlabError(f"'dpo_loss': the native engine computes {', '.join(NATIVE_DPO_LOSSES)}, not "
                               f"{', '.join(other)}; train it with 'engine: trl'")
    run = prepare_run(config, kind)
    config = run.config  # with --resume and only --out, the interrupted run's settings
    if config.engine == "native":
        return _train_native(run)
    quiet_libraries(config.progress)
    model, tokenizer = load_training_model(run)
    train_data, eval_data = datasets(run)
    trainer_class, specific = TRAINERS[kind](config, trainer_arguments(run))
    trainer = trainer_class(model=model, train_dataset=train_data, eval_dataset=eval_data,
                            processing_class=tokenizer, peft_config=lora_config(config), **specific)
    if not config.progress:  # with the bars off, transformers prints every log as a dict instead: silence it
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.add_callback(metrics_log(run.checkpoints.parent / METRICS_LOG))
    if config.early_stopping and eval_data is not None:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=config.early_stopping))
    open_output(run)
    started = time.time()
    try:
        trainer.train(resume_from_checkpoint=run.resume_from)
    except KeyboardInterrupt:
        save_on_interrupt(trainer, run)
        raise
    state = trainer.state
    if config.early_stopping and state.best_metric is not None and state.best_model_checkpoint:
        best_step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[-1])
        if best_step != state.global_step:  # load_best_model_at_end put that checkpoint's adapter back
            state.log_history.append({"best_eval_loss": state.best_metric, "best_step": best_step,
                                      "stopped_early": state.global_step < run.total_steps,
                                      "step": state.global_step})
    return finish_run(run, started, state.log_history, state.global_step, state.num_input_tokens_seen,
                      lambda folder: trainer.model.save_pretrained(str(folder)))


def _train_native(run) -> TrainResult:
    from qwenlab.adapters.peft_format import save_adapter_files
    from qwenlab.train.native.dpo import NativeDPO
    from qwenlab.train.native.sft import NativeSFT, train_native

    trainer, started = train_native(run, NativeDPO if run.kind == "dpo" else NativeSFT)
    return finish_run(run, started, trainer.history, trainer.step, trainer.tokens_seen,
                      lambda folder: save_adapter_files(trainer.adapter(), folder))


def quiet_libraries(progress: bool) -> None:
    """The libraries' notices about their own future APIs are for their callers' developers, not our users;
    without progress, every bar goes (dataset preparation and weight loading too, not only training's)."""
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|trl|peft|datasets)\.")
    if not progress:
        from datasets import disable_progress_bars
        from transformers.utils import logging as transformers_logging

        disable_progress_bars()
        transformers_logging.disable_progress_bar()


METRICS_LOG = "metrics.jsonl"  # one JSON object per logged step, numbers as numbers


def metrics_log(path: Path):
    """A TrainerCallback that appends every log (loss, learning rate, eval loss, ...) to `path` as it comes."""
    from transformers import TrainerCallback

    def number(value):
        if isinstance(value, str):  # transformers may hand over formatted numbers
            try:
                return float(value)
            except ValueError:
                return value
        return value

    class MetricsLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                row = {"step": state.global_step, **{k: number(v) for k, v in logs.items()}}
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")

    return MetricsLog()


def save_on_interrupt(trainer, run) -> None:
    """Ctrl-C: checkpoint the steps done so far (optimizer, scheduler, RNG, as every checkpoint) and say how
    to continue. A second Ctrl-C during the save leaves the previous checkpoint."""
    step = trainer.state.global_step
    if step > 0 and not (run.checkpoints / f"checkpoint-{step}").is_dir():
        trainer._save_checkpoint(trainer.model, trial=None)  # transformers' own checkpoint writer
    saved = f"checkpoint-{step} saved" if step > 0 else "no step was finished, nothing saved"
    say_interrupted(run, step, saved)


def train_sft(config: TrainConfig) -> TrainResult:
    return train(config, "sft")


def train_dpo(config: TrainConfig) -> TrainResult:
    return train(config, "dpo")
