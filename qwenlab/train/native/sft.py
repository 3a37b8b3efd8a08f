"""LoRA SFT on qwenlab's own model core (`--engine native`): the same run as TRL's SFTTrainer, less work per step.

What it shares with the TRL engine: the records (replay included), their tokens and loss masks (batches.py),
PEFT's LoRA init and scaling, AdamW, transformers' learning-rate schedules, gradient clipping at 1.0,
the loss (summed token cross-entropy over the targets of the optimizer step), checkpoints and --resume,
and the output folder (train/run.py). What it saves:
- the head runs on target positions only, in chunks (grpo/loss.selected_token_logprobs): a prompt's
  positions never meet the 151,936-row vocabulary, and no [B, T, vocab] logits exist, forward or backward;
- `--dtype bf16` keeps the frozen base in bf16 (half the memory, oneDNN's bf16 matmuls) with the LoRA
  weights and the optimizer in fp32;
- right padding with causal attention needs no mask, so attention takes SDPA's causal kernel;
- activation checkpointing switches on by itself when a micro-batch's activations would pass a budget
  (always with --gradient-checkpointing).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from qwenlab.adapters import active_adapters
from qwenlab.adapters.apply import lora_modules
from qwenlab.adapters.peft_format import LoraAdapter, save_adapter_files
from qwenlab.errors import QwenlabError
from qwenlab.model.memory import keep_freed_memory
from qwenlab.train.activations import over_activation_budget
from qwenlab.train.grpo.loss import selected_token_logprobs
from qwenlab.train.grpo.policy import POLICY, target_module_names, attach_policy, \
    load_policy_weights, policy_adapter
from qwenlab.train.native.batches import Batch, collate, step_batches, tokenize_examples
from qwenlab.train.run import TrainingRun

STATE_FILE = "native_state.pt"  # optimizer, scheduler, RNG: tensors and numbers only (loaded with weights_only)
TRAINER_STATE = "trainer_state.json"  # the name run.py's --resume looks for, as in transformers' checkpoints
MAX_GRAD_NORM = 1.0  # transformers' default


def peft_initial_lora(model, config, base_model: str) -> LoraAdapter:
    """The adapter TRL's SFTTrainer starts from at this seed, draw for draw: it calls transformers' set_seed(seed),
    then PEFT builds each target's lora_A and lora_B as nn.Linear (each initialised kaiming-uniform, a=√5) in the
    order of named_modules, then draws lora_A again (init_lora_weights=True) and zeroes lora_B."""
    from torch import nn

    torch.manual_seed(config.seed)
    modules = {}
    for name in target_module_names(model, tuple(config.target_modules)):
        linear = model.get_submodule(name)
        a = torch.empty(config.lora_r, linear.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear(in, r)
        b = torch.empty(linear.out_features, config.lora_r)
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))  # nn.Linear(r, out)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's reset_lora_parameters
        modules[name] = (a, b.zero_())
    return LoraAdapter(modules, alpha=float(config.lora_alpha), use_rslora=config.rslora,
                       dropout=config.lora_dropout, base_model=base_model, source="sft")


def warmup_steps(warmup: float, total: int) -> int:
    """transformers' rule: a fraction of the steps (rounded up) below 1, else a number of steps."""
    return math.ceil(warmup * total) if warmup < 1 else int(warmup)


class NativeSFT:
    """The model core with a trainable LoRA, its optimizer and schedule, and one optimizer step at a time."""

    def __init__(self, run: TrainingRun):
        from transformers import AutoTokenizer, get_scheduler

        from qwenlab.checkpoint import open_checkpoint
        from qwenlab.model import load_model
        from qwenlab.model.load import parse_dtype

        config = self.config = run.config
        self.run = run
        if config.threads:
            torch.set_num_threads(config.threads)
        keep_freed_memory()
        dtype = parse_dtype(config.dtype)
        self.model = load_model(open_checkpoint(str(run.base)), dtype)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(run.base))
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self.template = peft_initial_lora(self.model, config, base_model=str(run.base))
        self.params = attach_policy(self.model, self.template)
        for module in lora_modules(self.model).values():
            module.dropout = config.lora_dropout
            module.compute_dtype = dtype if dtype != torch.float32 else None
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate_for(run.kind),
                                           weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(config.scheduler, self.optimizer,
                                       num_warmup_steps=warmup_steps(config.warmup, run.total_steps),
                                       num_training_steps=run.total_steps)
        self.train_examples = self.tokenize(run.train_records)
        if not self.train_examples:
            raise QwenlabError(f"{config.data}: no training example has a target token within max_length "
                               f"{config.max_length} (every prompt fills it); raise max_length")
        self.eval_examples = self.tokenize(run.eval_records)
        self.step = 0
        self.tokens_seen = 0
        self.last_stats: dict[str, float] = {}  # the last step's extra metrics (DPO's rewards), logged with it
        self.history: list[dict] = []

    def tokenize(self, records: list[dict]) -> list:
        return tokenize_examples(records, self.tokenizer, self.config.max_length)

    # ---- one step ------------------------------------------------------------------
    def token_logprobs(self, tokens: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """log p(next token) at the target positions [B, T-1] (0 elsewhere); the head on those positions only."""
        self.model.checkpoint_layers = (self.config.gradient_checkpointing
                                        or over_activation_budget(self.model.config, tuple(tokens.shape),
                                                                 self.model.dtype))
        try:
            hidden = self.model.final_hidden(tokens)
        finally:
            self.model.checkpoint_layers = False
        return selected_token_logprobs(hidden, self.model.head_weight, tokens, target_mask)

    def _summed_nll(self, batch: Batch) -> torch.Tensor:
        """Σ -log p(target) over the batch's target positions."""
        return -(self.token_logprobs(batch.tokens, batch.target_mask) * batch.target_mask).sum()

    def micro_batches(self, step: int) -> list[Batch]:
        return [self.collate([self.train_examples[i] for i in indices])
                for indices in step_batches(len(self.train_examples), self.config.batch_size, self.config.grad_accum,
                                            self.config.seed, step)]

    def collate(self, examples: list) -> Batch:
        return collate(examples, self.pad_id)

    def backward(self, batches: list) -> tuple[float, int]:
        """The step's loss over its micro-batches, backpropagated: the mean over all their targets (transformers'
        num_items_in_batch normalisation). Returns (loss, targets)."""
        targets = sum(b.targets for b in batches)
        total = 0.0
        for batch in batches:
            if not batch.targets:
                continue
            loss = self._summed_nll(batch) / max(targets, 1)
            loss.backward()
            total += float(loss.detach())
        return total, targets

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches."""
        batches = self.micro_batches(self.step)
        self.model.train()
        with active_adapters(self.model, POLICY):
            total, targets = self.backward(batches)
        self.model.eval()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)) if targets else 0.0
        learning_rate = self.scheduler.get_last_lr()[0]
        if targets:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # kept, not freed: see attach_policy
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += sum(b.real_tokens for b in batches)
        return {"loss": total, "grad_norm": grad_norm, "learning_rate": learning_rate, "targets": targets,
                "metrics": self.last_stats}

    @torch.no_grad()
    def eval_loss(self) -> float | None:
        """The loss over the eval set: each batch's summed loss over the sum of its weights (targets here)."""
        if not self.eval_examples:
            return None
        total, weight = 0.0, 0
        with active_adapters(self.model, POLICY):
            for start in range(0, len(self.eval_examples), self.config.batch_size):
                batch_total, batch_weight = self.eval_batch(self.collate(self.eval_examples[start:start
                                                                                             + self.config.batch_size]))
                total, weight = total + batch_total, weight + batch_weight
        return total / weight if weight else None

    def eval_batch(self, batch: Batch) -> tuple[float, int]:
        return (float(self._summed_nll(batch)), batch.targets) if batch.targets else (0.0, 0)

    # ---- checkpoints ---------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """checkpoints/checkpoint-N: the adapter (PEFT files), the optimizer/scheduler/RNG state, and
        trainer_state.json; written to a temporary sibling and renamed; older ones beyond the limit removed."""
        folder = self.run.checkpoints / f"checkpoint-{self.step}"
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_adapter_files(self.adapter(), tmp)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "rng": torch.get_rng_state()}, tmp / STATE_FILE)
        (tmp / TRAINER_STATE).write_text(json.dumps(
            {"engine": "native", "global_step": self.step, "num_input_tokens_seen": self.tokens_seen,
             "log_history": self.history}, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        limit = self.config.save_total_limit
        if limit:
            saved = sorted((p for p in self.run.checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                           key=lambda p: int(p.name.split("-")[-1]))
            for old in saved[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
        return folder

    def load_checkpoint(self, folder: str | Path) -> None:
        from qwenlab.adapters import read_adapter

        folder = Path(folder)
        if not (folder / STATE_FILE).is_file():
            raise QwenlabError(f"{folder}: not a checkpoint of the native engine (no {STATE_FILE}); resume it with "
                               "--engine trl, the engine that wrote it")
        load_policy_weights(self.model, read_adapter(folder))
        state = torch.load(folder / STATE_FILE, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        trainer_state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
        self.step = int(trainer_state["global_step"])
        self.tokens_seen = int(trainer_state.get("num_input_tokens_seen", 0))
        self.history = list(trainer_state.get("log_history", []))

    def adapter(self):
        adapter = policy_adapter(self.model, self.template)
        adapter.dropout = self.config.lora_dropout
        return adapter


class EarlyStopping:
    """transformers' EarlyStoppingCallback for the native loop: stop after `patience` evaluations in a row without
    a lower eval loss, and hand back the LoRA weights of the best one (as load_best_model_at_end does)."""

    def __init__(self, patience: int):
        self.patience, self.best, self.best_step, self.misses, self.weights = patience, math.inf, None, 0, None

    def update(self, eval_loss: float | None, step: int, params) -> bool:
        if eval_loss is None:
            return False
        if eval_loss < self.best:
            self.best, self.best_step, self.misses = eval_loss, step, 0
            self.weights = [p.detach().clone() for p in params]
            return False
        self.misses += 1
        return self.misses >= self.patience

    def restore(self, params) -> None:
        with torch.no_grad():
            for param, best in zip(params, self.weights):
                param.copy_(best)


def train_native(run: TrainingRun, trainer_class: type[NativeSFT] = NativeSFT) -> tuple[NativeSFT, float]:
    """The loop behind `qwenlab train sft|dpo --engine native`: steps, logs, evals, checkpoints, a progress bar;
    Ctrl-C saves a checkpoint of the steps done. Returns the trainer and the run's start time."""
    from tqdm import tqdm

    from qwenlab.train.run import open_output, say_interrupted

    config = run.config
    trainer = trainer_class(run)
    open_output(run)
    if run.resume_from:
        trainer.load_checkpoint(run.resume_from)
    started = time.time() - (trainer.history[-1].get("train_runtime", 0.0) if trainer.history else 0.0)
    save_every = config.save_steps or run.total_steps
    eval_every = config.eval_steps or save_every
    bar = tqdm(total=run.total_steps, initial=trainer.step, desc=f"train {run.kind} (native)", unit="step",
               disable=not config.progress, file=sys.stderr)
    losses: list[float] = []
    since_log: list[float] = []
    watch = EarlyStopping(config.early_stopping) if config.early_stopping and trainer.eval_examples else None
    try:
        while trainer.step < run.total_steps:
            stats = trainer.train_step()
            losses.append(stats["loss"])
            since_log.append(stats["loss"])
            step = trainer.step
            if step % config.logging_steps == 0 or step == 1:  # as transformers (logging_first_step)
                # transformers logs the mean loss over the steps since its last log
                row = {"loss": round(sum(since_log) / len(since_log), 6), "grad_norm": round(stats["grad_norm"], 6),
                       "learning_rate": stats["learning_rate"], "epoch": round(step * config.batch_size
                       * config.grad_accum / max(len(trainer.train_examples), 1), 4),
                       "num_input_tokens_seen": trainer.tokens_seen,
                       "train_runtime": round(time.time() - started, 3), "step": step}
                row.update({key: round(value, 6) for key, value in stats.get("metrics", {}).items()})
                trainer.history.append(row)
                since_log = []
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
            stop = False
            if trainer.eval_examples and (step % eval_every == 0 or step == run.total_steps):
                eval_loss = trainer.eval_loss()
                trainer.history.append({"eval_loss": eval_loss, "step": step})
                stop = watch.update(eval_loss, step, trainer.params) if watch else False
            if stop or step == run.total_steps:
                if watch and watch.best_step is not None and watch.best_step != step:
                    watch.restore(trainer.params)
                    trainer.history.append({"best_eval_loss": watch.best, "best_step": watch.best_step,
                                            "stopped_early": stop, "step": step})
            if stop or step % save_every == 0 or step == run.total_steps:
                if (stop or step == run.total_steps) and losses:
                    trainer.history.append({"train_loss": sum(losses) / len(losses), "step": step})
                trainer.save_checkpoint()
            bar.update(1)
            if stop:
                bar.write(f"early stopping: {watch.patience} evaluations without a lower eval loss; the adapter of "
                          f"step {watch.best_step} (eval loss {watch.best:.4f}) is kept")
                break
    except KeyboardInterrupt:
        bar.close()
        saved = "no step was finished, nothing saved"
        if trainer.step > 0:
            trainer.save_checkpoint()
            saved = f"checkpoint-{trainer.step} saved"
        say_interrupted(run, trainer.step, saved)
        raise
    bar.close()
    return trainer, started
