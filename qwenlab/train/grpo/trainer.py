"""LoRA GRPO on verifiable tasks: rollouts on the project's engine, the loss as TRL computes it.

    learner = GRPOLearner.create(GRPOConfig(model="nano", tasks=["arithmetic"]))
    rollouts = learner.rollouts(instances, seed=step)      # G completions per instance, scored
    stats = learner.train_step(rollouts)                  # one AdamW step on the LoRA weights

`run_grpo` is the loop behind `qwenlab train grpo`: sample tasks, roll out, step, log, checkpoint.
The swarm peer (qwenlab.swarm.peer) uses the same learner with rollouts from other peers mixed in.

Why not TRL's GRPOTrainer: on a CPU the step is all generation, and its generate() (transformers,
no KV-cache reuse tricks, per-token Python in the HF loop) was measured slower than this engine;
benchmarks/grpo_bench.py has the figures. The loss is TRL's (see loss.py).
CPU safety: the model is loaded in fp32 whatever config.json says (nano ships bf16 weights) unless
--dtype bf16 asks; memory per step is bounded by batch × generations × tokens, and activation
checkpointing (auto) keeps it under train.activations.ACTIVATION_BUDGET_BYTES of activations per micro-batch.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qwenlab.adapters import active_adapters, merge_adapter, read_adapter, unmerge_adapter, without_adapter_wrappers
from qwenlab.adapters.peft_format import save_adapter_files
from qwenlab.errors import QwenlabError
from qwenlab.model.generate import GenerationConfig
from qwenlab.model.tokenizer import IM_END
from qwenlab.quant.float_native import load_native_float_model, native_float_applies
from qwenlab.tasks import parse_task_list
from qwenlab.train.activations import over_activation_budget
from qwenlab.train.grpo.curves import JsonlLog, plot_curves
from qwenlab.train.grpo.loss import LOSS_TYPES, SCALE_REWARDS, batch_advantages, grpo_loss, pack_batch, \
    selected_token_logprobs
from qwenlab.train.grpo.rollouts import has_answer_block
from qwenlab.train.grpo.policy import ALL_LINEAR, POLICY, LoraSettings, attach_policy, load_policy_weights, \
    new_lora, policy_adapter
from qwenlab.train.grpo.policy_rows import policy_rows
from qwenlab.train.grpo.rollouts import Rollout, draw_instances, generate_rollouts

STATE_FILE = "trainer_state.pt"


@dataclass
class GRPOConfig:
    model: str = "nano"
    tasks: list[str] = field(default_factory=lambda: ["arithmetic"])
    difficulty: int | None = None  # None: each task's default
    steps: int = 50
    batch: int = 8  # prompts (groups) per step
    num_generations: int = 8  # completions per prompt (G)
    beta: float = 0.0  # KL weight; 0 (TRL's default) skips the reference pass
    loss_type: str = "dapo"  # grpo | dr_grpo | dapo (loss.py has each normalisation)
    epsilon: float = 0.2  # ε_low: the ratio's lower clip
    epsilon_high: float = 0.28  # ε_high: the upper clip (DAPO's clip-higher; SAPO uses 0.2 / 0.28)
    scale_rewards: str = "group"  # group | batch | none: what the advantage is divided by
    mask_truncated_completions: bool = False  # completions cut at max_new_tokens add nothing to the loss
    format_reward: float = 0.0  # added to the reward of a completion with an <answer>...</answer> block
    learning_rate: float = 2e-4
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    init_adapter: str | None = None  # start from this PEFT adapter folder instead of B = 0
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    micro_batch: int = 64  # rows per forward/backward (gradient accumulation above it)
    # Recompute each decoder layer's activations in the backward instead of keeping them: auto turns it on when a
    # micro-batch's kept activations would pass ACTIVATION_BUDGET_BYTES (the 0.5B shape at 32 rows x 100 tokens, fp32:
    # ~6 GB estimated, ~0.1 GB with it, for ~30% more compute).
    activation_checkpointing: str = "auto"  # auto | on | off
    merge_for_generation: bool = True  # fold the LoRA into fp32 weights while sampling (faster, same policy)
    dtype: str = "fp32"  # the frozen base's weights: fp32, or bf16 (bf16 matmuls, AMX where it runs; LoRA stays fp32)
    seed: int = 0
    save_every: int = 10
    threads: int | None = None

    def validate(self) -> "GRPOConfig":
        if not self.tasks:
            raise QwenlabError("grpo: give at least one task")
        parse_task_list(self.tasks)  # each spelling opens: an unknown name or a missing file is one line
        positive = {"steps": self.steps, "batch": self.batch, "lora_rank": self.lora_rank,
                    "max_new_tokens": self.max_new_tokens, "micro_batch": self.micro_batch}
        for name, value in positive.items():
            if value < 1:
                raise QwenlabError(f"grpo: {name} must be >= 1, got {value}")
        if self.num_generations < 2:
            raise QwenlabError(f"grpo: num_generations must be >= 2 (advantages compare completions), "
                               f"got {self.num_generations}")
        if self.temperature <= 0:
            raise QwenlabError(f"grpo: temperature must be > 0 (GRPO needs sampled, varied completions), "
                               f"got {self.temperature}")
        if self.activation_checkpointing not in ("auto", "on", "off"):
            raise QwenlabError(f"grpo: activation_checkpointing must be auto, on or off, "
                               f"got {self.activation_checkpointing!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise QwenlabError(f"grpo: dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.beta < 0 or self.learning_rate <= 0:
            raise QwenlabError("grpo: beta must be >= 0 and learning_rate > 0")
        if self.loss_type not in LOSS_TYPES:
            raise QwenlabError(f"grpo: loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise QwenlabError(f"grpo: scale_rewards must be one of {', '.join(SCALE_REWARDS)}, "
                               f"got {self.scale_rewards!r}")
        if not (0 < self.epsilon < 1 and self.epsilon_high > 0) or self.format_reward < 0:
            raise QwenlabError("grpo: need 0 < epsilon < 1, epsilon_high > 0 and format_reward >= 0")
        return self


class GRPOLearner:
    """A model core with a trainable LoRA policy, its optimizer, and the GRPO step."""

    def __init__(self, model, tokenizer, config: GRPOConfig, adapter, base_path: str | Path | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config.validate()
        self.base_path = base_path
        self.adapter_template = adapter
        self.params = attach_policy(model, adapter)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=0.0)
        self.step = 0  # optimizer steps taken
        end = tokenizer.token_id(IM_END)
        self.end_id = end if end is not None else tokenizer.eos_id
        self._prompt_cache: dict[str, list[int]] = {}

    @classmethod
    def create(cls, config: GRPOConfig) -> "GRPOLearner":
        from qwenlab.checkpoint import open_checkpoint
        from qwenlab.model import load_model, load_tokenizer

        if config.threads:
            torch.set_num_threads(config.threads)
        checkpoint = open_checkpoint(config.model)
        # fp32 unless asked (never a bf16 default from config.json); on the native float stack where its kernels
        # run, so that a rollout's decode steps are one native call each (rollouts()), while training runs autograd.
        if native_float_applies(config.dtype):
            model = load_native_float_model(checkpoint, config.dtype)
        else:
            model = load_model(checkpoint, config.dtype)
        tokenizer = load_tokenizer(checkpoint.path)
        if config.init_adapter:
            adapter = read_adapter(config.init_adapter)
        else:
            settings = LoraSettings(config.lora_rank, config.lora_alpha, tuple(config.lora_targets))
            adapter = new_lora(model, settings, seed=config.seed, base_model=str(checkpoint.path))
        return cls(model, tokenizer, config, adapter, base_path=checkpoint.path)

    # ---- rollouts ---------------------------------------------------------------------
    def generation_config(self, seed: int) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=self.config.max_new_tokens, temperature=self.config.temperature,
                                top_p=self.config.top_p, seed=seed)

    def rollouts(self, instances, seed: int) -> list[Rollout]:
        """G completions per instance from the current policy, scored.

        With merge_for_generation the adapter is folded into the base weights (W + s·B·A) for the
        generation and taken out after: the same policy, without two extra matmuls per linear per
        token (about a quarter of nano's generation time). In fp32 the round trip changes W by
        float rounding only.
        """
        self.model.eval()
        if not self.config.merge_for_generation or self.config.dtype != "fp32":
            # Unmerged: each decode step adds the policy's deltas per row (natively, on the decode stack).
            with policy_rows(self.model, POLICY, len(instances) * self.config.num_generations):
                return generate_rollouts(self.model, self.tokenizer, instances, self.config.num_generations,
                                         self.generation_config(seed))
        merge_adapter(self.model, POLICY)
        try:
            # The merged policy is all in the base weights: without the adapter wrappers, a decode step of the
            # native float model runs every layer in one native call (its decode stack), on those same weights.
            with without_adapter_wrappers(self.model):
                return generate_rollouts(self.model, self.tokenizer, instances, self.config.num_generations,
                                         self.generation_config(seed), use_policy=False)
        finally:
            unmerge_adapter(self.model, POLICY)

    # ---- the GRPO step ----------------------------------------------------------------
    def _prompt_ids(self, prompt: str) -> list[int]:
        ids = self._prompt_cache.get(prompt)
        if ids is None:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            ids = self.tokenizer.encode(text)
            if len(self._prompt_cache) > 4096:  # bounded: prompts are rarely repeated
                self._prompt_cache.clear()
            self._prompt_cache[prompt] = ids
        return ids

    def _completion_ids(self, rollout: Rollout, index: int) -> list[int]:
        """The rollout's ids (sampled here, or fixed by the swarm's re-scoring), else its re-tokenised text;
        + <|im_end|> if it stopped.

        A text-only completion longer than max_new_tokens is refused, not cut: its reward was given to
        the whole text, and training on a prefix would reward tokens that were never scored
        (score the text of `trained_completion` instead, as the swarm does).
        """
        if rollout.completion_ids is not None:
            ids = list(rollout.completion_ids[index])
        else:
            ids = self.tokenizer.encode(rollout.completions[index])
            if len(ids) > self.config.max_new_tokens:
                raise QwenlabError(f"grpo: a {rollout.source} completion of {rollout.task} seed {rollout.seed} has "
                                   f"{len(ids)} tokens, more than max_new_tokens {self.config.max_new_tokens}: its "
                                   "reward would not be the reward of the tokens trained on")
        if rollout.finish_reasons[index] == "stop" and self.end_id is not None:
            ids.append(self.end_id)
        return ids

    def training_rewards(self, rollout: Rollout) -> list[float]:
        """The task's rewards, plus format_reward for each completion holding an <answer> block."""
        if not self.config.format_reward:
            return list(rollout.rewards)
        return [r + self.config.format_reward * has_answer_block(text)
                for r, text in zip(rollout.rewards, rollout.completions)]

    def _checkpoint_layers(self, tokens: torch.Tensor) -> bool:
        """Whether this micro-batch's forward recomputes its layers in the backward (activation_checkpointing)."""
        choice = self.config.activation_checkpointing
        if choice != "auto":
            return choice == "on"
        return over_activation_budget(self.model.config, tuple(tokens.shape), self.model.dtype)

    def _logprobs(self, packed) -> torch.Tensor:
        """log π of each completion token ([B, T-1], 0 off the completions): the head runs on completion positions
        only and in chunks (loss.selected_token_logprobs), so the [B, T, vocab] logits never exist."""
        self.model.checkpoint_layers = self._checkpoint_layers(packed.tokens)
        try:
            hidden = self.model.final_hidden(packed.tokens)
        finally:
            self.model.checkpoint_layers = False
        return selected_token_logprobs(hidden, self.model.head_weight, packed.tokens, packed.completion_mask,
                                       self.config.temperature)

    def train_step(self, rollouts: list[Rollout]) -> dict:
        """One optimizer step on these groups (each of any size >= 2); returns loss/KL/token counts."""
        self.model.train()
        c = self.config
        prompts, completions, groups, truncated = [], [], [], []
        for rollout in rollouts:
            for i in range(len(rollout.completions)):
                prompts.append(self._prompt_ids(rollout.prompt))
                completions.append(self._completion_ids(rollout, i))
                truncated.append(rollout.finish_reasons[i] == "length")
            groups.append(torch.tensor(self.training_rewards(rollout), dtype=torch.float32))
        advantages = batch_advantages(groups, c.scale_rewards)
        masked = [c.mask_truncated_completions and t for t in truncated]  # TRL: truncated rows' masks are 0
        # the "dapo" normaliser counts every unmasked completion token; "grpo"/"dr_grpo" count completions
        num_tokens = sum(len(ids) for ids, off in zip(completions, masked) if not off)
        # Rows with advantage 0 (groups where every completion scored the same) and masked rows add exactly
        # nothing to the loss or gradient when beta = 0, so their forward pass is skipped; they still count above.
        rows = [i for i in range(len(prompts)) if not masked[i] and (c.beta != 0.0 or advantages[i] != 0)]
        self.optimizer.zero_grad(set_to_none=False)  # kept, not freed: see attach_policy
        total_loss, total_kl, kl_tokens = 0.0, 0.0, 0
        for start in range(0, len(rows), c.micro_batch):
            chunk = rows[start:start + c.micro_batch]
            packed = pack_batch([prompts[i] for i in chunk], [completions[i] for i in chunk], advantages[chunk],
                                self.tokenizer.pad_id)
            ref = None
            if c.beta != 0.0:
                with torch.no_grad(), active_adapters(self.model, None):
                    ref = self._logprobs(packed)
            # The backward inside the block too: with activation checkpointing it reruns the layers, which must
            # see the policy active as the forward did.
            with active_adapters(self.model, POLICY):
                logprobs = self._logprobs(packed)
                loss, info = grpo_loss(logprobs, packed.completion_mask, packed.advantages, ref_logprobs=ref,
                                       beta=c.beta, epsilon=c.epsilon, epsilon_high=c.epsilon_high,
                                       loss_type=c.loss_type, num_tokens=num_tokens, num_rows=len(prompts),
                                       max_completion_length=c.max_new_tokens)
                loss.backward()
            total_loss += float(loss.detach())
            chunk_tokens = int(packed.completion_mask.sum())
            total_kl += info["kl"] * chunk_tokens
            kl_tokens += chunk_tokens
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)) if rows else 0.0
        if rows:
            self.optimizer.step()
        self.step += 1
        self.model.eval()
        return {"loss": round(total_loss, 6), "kl": round(total_kl / max(kl_tokens, 1), 6),
                "grad_norm": round(grad_norm, 6), "tokens": num_tokens, "rows_trained": len(rows),
                "groups": len(rollouts), "truncated_masked": sum(masked)}

    # ---- checkpoints ------------------------------------------------------------------
    def adapter(self):
        return policy_adapter(self.model, self.adapter_template)

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Adapter (PEFT files) + optimizer, step and RNG state, written atomically into `folder`."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_adapter_files(self.adapter(), tmp)
        torch.save({"optimizer": self.optimizer.state_dict(), "step": self.step,
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                    "config": asdict(self.config), "extra": extra or {}}, tmp / STATE_FILE)
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
        return folder

    def load(self, folder: str | Path) -> dict:
        """Restore a `save`d checkpoint into this learner; returns the `extra` dict saved with it."""
        folder = Path(folder)
        load_policy_weights(self.model, read_adapter(folder))
        state = torch.load(folder / STATE_FILE, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_random_state(state["rng"]["python"]))
        return dict(state.get("extra") or {})


def _as_random_state(state):
    version, internal, gauss = state
    return version, tuple(internal), gauss


def has_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / STATE_FILE).is_file()


# ---- the `qwenlab train grpo` loop ----------------------------------------------------------
class GracefulStop:
    """First SIGINT/SIGTERM: finish the current step, checkpoint, stop. Second: KeyboardInterrupt at once.

    So a checkpoint is never written from the middle of an optimizer step.
    """

    def __init__(self, message: str):
        self.requested, self.message, self._previous = False, message, {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(self.message, flush=True)


def save_final_adapter(learner: GRPOLearner, folder: str | Path, method: str, config: dict) -> Path:
    """The trained adapter as a PEFT folder with the base's tokenizer files and a lineage.json."""
    from qwenlab.checkpoint import copy_tokenizer_files
    from qwenlab.checkpoint.lineage import make_lineage, write_lineage
    from qwenlab.checkpoint.writer import atomic_folder

    folder = Path(folder)
    # Written beside and swapped in when complete: Ctrl-C here leaves the previous adapter or none.
    # (It belongs to this run's folder, so it is replaced without --force; the inputs were read at start.)
    with atomic_folder(folder, force=True) as tmp:
        save_adapter_files(learner.adapter(), tmp)
        if learner.base_path is not None:
            copy_tokenizer_files(Path(learner.base_path), tmp)
            inputs = {"base": learner.base_path}
            if learner.config.init_adapter:
                inputs["init_adapter"] = learner.config.init_adapter
            write_lineage(tmp, make_lineage("adapter", method, inputs, config))
    return folder


def check_grpo_inputs(config: GRPOConfig) -> None:
    """The model folder and the starting adapter are readable: checked before any output is made, so a
    mistyped path leaves nothing behind (reads config.json and the files' headers, no weights)."""
    from qwenlab.adapters.peft_format import read_adapter_config
    from qwenlab.checkpoint import open_checkpoint

    open_checkpoint(config.model)
    if config.init_adapter:
        read_adapter_config(config.init_adapter)


def run_grpo(config: GRPOConfig, out: str | Path, resume: bool = True, progress: bool = True) -> dict:
    """Train for config.steps steps; out/ gets checkpoint/, adapter/, rewards.jsonl and rewards.png."""
    out = Path(out)
    learner = GRPOLearner.create(config)  # a bad model or adapter fails here, before out/ exists
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_dir, log = out / "checkpoint", JsonlLog(out / "rewards.jsonl")
    if resume and has_checkpoint(checkpoint_dir):
        learner.load(checkpoint_dir)
        log.keep(lambda r: r["step"] <= learner.step)
        _say(progress, f"resumed from {checkpoint_dir} at step {learner.step}")
    elif log.path.exists():
        log.path.unlink()
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    stop = GracefulStop("grpo: stopping after this step (checkpoint first); press Ctrl-C again to stop now")
    try:
        with stop:
            while learner.step < config.steps and not stop.requested:
                step = learner.step + 1
                started = time.perf_counter()
                instances = draw_instances(config.tasks, config.batch, f"grpo:{config.seed}:{step}",
                                           config.difficulty)
                rollouts = learner.rollouts(instances, seed=config.seed * 1_000_003 + step)
                generated = time.perf_counter()
                stats = learner.train_step(rollouts)
                row = {"step": step, "reward": round(sum(r.mean_reward for r in rollouts) / len(rollouts), 4),
                       **stats, "seconds_generate": round(generated - started, 3),
                       "seconds_train": round(time.perf_counter() - generated, 3)}
                log.append(row)
                _say(progress, f"step {step}/{config.steps}  reward {row['reward']:.3f}  loss {row['loss']:+.4f}  "
                               f"gen {row['seconds_generate']:.2f}s  train {row['seconds_train']:.2f}s")
                if step % config.save_every == 0 or step == config.steps:
                    learner.save(checkpoint_dir)
            learner.save(checkpoint_dir)
    except KeyboardInterrupt:
        _say(True, f"grpo: stopped at once; the last checkpoint in {checkpoint_dir} stands")
        raise
    finally:
        plot_curves(log.rows(), out / "rewards.png", "step", {"mean reward": "reward"}, "GRPO reward")
    final = save_final_adapter(learner, out / "adapter", "grpo", asdict(config))
    rows = log.rows()
    return {"steps": learner.step, "adapter": str(final), "first_reward": rows[0]["reward"] if rows else None,
            "last_reward": rows[-1]["reward"] if rows else None, "stopped": stop.requested}


def _say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, flush=True)
