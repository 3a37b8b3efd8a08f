"""The training config: one dataclass, the single source of YAML keys and `qwenlab train` flags.

A YAML file holds any of the fields below (`lora_r: 8`); a flag (`--lora-r 8`) overrides it.
Unknown keys and values of the wrong type fail with the key's name and the file.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path


from qwenlab.errors import QwenlabError
from qwenlab.yaml_file import read_yaml

DEFAULT_LEARNING_RATE = {"sft": 2e-4, "dpo": 5e-5}
# transformers' lr_scheduler_type values that need no scheduler-specific arguments (cosine_with_min_lr,
# reduce_lr_on_plateau, ... fail deep inside the trainer without them)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
ENGINES = ("trl", "native")
# TRL 1.x DPOConfig.loss_type values
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


def _linear_modules() -> list[str]:
    # Imported late: qwenlab.checkpoint pulls in torch, and `qwenlab --help` should not wait for it.
    from qwenlab.checkpoint.names import LINEAR_MODULES

    return list(LINEAR_MODULES)


def _help(text: str, default=MISSING, factory=MISSING):
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    # what to train on, and where to write
    base: str = _help("the base model: a folder or 'nano'", "nano")
    data: str = _help("training JSONL (messages | prompt/completion | prompt/chosen/rejected)", "")
    out: str = _help("output folder: the adapter, plus checkpoints/ for --resume", "")
    eval_data: str | None = _help("validation JSONL (default: split val_fraction off the training data)", None)
    val_fraction: float = _help("fraction of the data held out for eval loss when no eval_data (0: none)", 0.05)
    # LoRA
    lora_r: int = _help("LoRA rank r", 16)
    lora_alpha: float = _help("LoRA alpha (scaling alpha/r, or alpha/sqrt(r) with rslora)", 32.0)
    lora_dropout: float = _help("dropout on the LoRA input", 0.05)
    target_modules: list[str] = _help("linear modules to adapt (default: all of attention and MLP)",
                                      factory=_linear_modules)
    rslora: bool = _help("rank-stabilised LoRA: scaling alpha/sqrt(r)", False)
    # optimisation
    steps: int = _help("optimizer steps (0: run `epochs` over the data)", 0)
    # 3 passes, as TRL's and LLaMA-Factory's defaults: one pass over a small set barely moves the adapter
    # (docs/adapters.md, "Defaults, measured").
    epochs: float = _help("passes over the data when steps is 0", 3.0)
    batch_size: int = _help("sequences per optimizer step (per gradient accumulation step)", 8)
    grad_accum: int = _help("gradient accumulation steps", 1)
    learning_rate: float | None = _help("peak learning rate (default 2e-4 for SFT, 5e-5 for DPO)", None)
    scheduler: str = _help("learning-rate schedule (transformers' lr_scheduler_type)", "cosine")
    warmup: float = _help("warmup: a fraction of the steps if < 1, else a number of steps", 0.05)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    max_length: int = _help("longest tokenized example (longer ones are truncated)", 512)
    beta: float = _help("DPO beta (strength of the pull towards the reference model)", 0.1)
    dpo_loss: list[str] = _help("DPO loss terms, summed (TRL's loss_type); 'sigmoid,sft' adds the NLL of "
                                "chosen (RPO), which keeps DPO from lowering both answers' likelihood",
                                factory=lambda: ["sigmoid"])
    # run
    replay: float = _help("share of the training set made of the base's own greedy answers to other prompts, "
                          "so the adapter keeps what the base could do (SFT; 0: off)", 0.0)
    replay_prompts: str | None = _help("JSONL of prompts for replay (messages or prompt); default: prompts of "
                                       "replay_tasks", None)
    replay_tasks: list[str] = _help("built-in tasks whose prompts replay uses when no replay_prompts",
                                    factory=lambda: ["arithmetic", "reverse", "sort_letters", "count_letter", "repeat"])
    replay_answers: str = _help("whose answers replay trains on: 'base' (the base's own greedy answers) or "
                                "'reference' (rehearsal: the tasks' reference answers, or the replay_prompts "
                                "file's assistant turns)", "base")
    engine: str = _help("the training loop: 'trl' (TRL's trainer on transformers + PEFT) or 'native' (SFT or "
                        "DPO on qwenlab's own model core: the head on target tokens only; docs/adapters.md)", "trl")
    dtype: str = _help("compute dtype: fp32 (CPU default) or bf16 (trl: autocast with fp32 master weights; "
                       "native: the frozen base in bf16, LoRA and optimizer in fp32)", "fp32")
    seed: int = _help("seed of the LoRA init, the data order and dropout", 0)
    logging_steps: int = _help("log the loss every N steps", 5)
    save_steps: int = _help("write checkpoints/checkpoint-N every N steps (0: only at the end)", 50)
    save_total_limit: int = _help("checkpoints to keep (0: all)", 2)
    eval_steps: int = _help("eval loss every N steps (0: at each checkpoint)", 0)
    early_stopping: int = _help("stop after this many evaluations in a row without a lower eval loss, and keep the "
                                "adapter of the best one (0: off; needs eval data)", 0)
    threads: int = _help("torch CPU threads (0: torch's default)", 0)
    gradient_checkpointing: bool = _help("recompute activations in backward (less memory, slower)", False)
    resume: bool = _help("continue from the latest checkpoint in OUT/checkpoints", False)
    resume_from: str | None = _help("continue from this checkpoint-N folder", None)
    force: bool = _help("replace an existing output folder", False)
    progress: bool = _help("show a progress bar", True)

    def learning_rate_for(self, kind: str) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE[kind]

    def validate(self, source: str = "config") -> "TrainConfig":
        for name in ("data", "out"):
            resumed = name == "data" and (self.resume or self.resume_from)  # then it comes from the run (run.py)
            if not getattr(self, name) and not resumed:
                raise QwenlabError(f"{source}: '{name}' is required")
        _check_output_parent(Path(self.out), source)
        positive = ("lora_r", "batch_size", "grad_accum", "max_length", "logging_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise QwenlabError(f"{source}: '{name}' must be > 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:  # numpy's seed range, which transformers' set_seed uses
            raise QwenlabError(f"{source}: 'seed' must be from 0 to 2**32-1, got {self.seed}")
        for name in ("steps", "save_steps", "save_total_limit", "eval_steps", "threads", "early_stopping"):
            if getattr(self, name) < 0:
                raise QwenlabError(f"{source}: '{name}' must be >= 0, got {getattr(self, name)}")
        for f in fields(self):  # nan/inf would reach the optimizer and poison every weight
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise QwenlabError(f"{source}: '{f.name}' must be a finite number, got {value}")
        if self.lora_alpha <= 0:
            raise QwenlabError(f"{source}: 'lora_alpha' must be > 0, got {self.lora_alpha}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise QwenlabError(f"{source}: 'learning_rate' must be > 0, got {self.learning_rate}")
        for name in ("warmup", "weight_decay"):
            if getattr(self, name) < 0:
                raise QwenlabError(f"{source}: '{name}' must be >= 0, got {getattr(self, name)}")
        if self.beta <= 0:
            raise QwenlabError(f"{source}: 'beta' must be > 0, got {self.beta}")
        if self.scheduler not in SCHEDULERS:
            raise QwenlabError(f"{source}: 'scheduler' must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if not 0 <= self.lora_dropout < 1:
            raise QwenlabError(f"{source}: 'lora_dropout' must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.replay < 1:
            raise QwenlabError(f"{source}: 'replay' must be a share from 0 to below 1 (0.2: a fifth of the "
                               f"training set), got {self.replay}")
        if self.replay_answers not in ("base", "reference"):
            raise QwenlabError(f"{source}: 'replay_answers' must be 'base' or 'reference', got {self.replay_answers!r}")
        if not 0 <= self.val_fraction < 1:
            raise QwenlabError(f"{source}: 'val_fraction' must be in [0, 1), got {self.val_fraction}")
        if self.early_stopping and not self.eval_data and self.val_fraction == 0:
            raise QwenlabError(f"{source}: 'early_stopping' watches the eval loss: give 'eval_data' or a "
                               "'val_fraction' above 0")
        if self.early_stopping and self.eval_steps and self.save_steps and self.save_steps % self.eval_steps:
            raise QwenlabError(f"{source}: with 'early_stopping', 'save_steps' ({self.save_steps}) must be a multiple "
                               f"of 'eval_steps' ({self.eval_steps}), so the best evaluation has a checkpoint")
        if self.steps == 0 and self.epochs <= 0:
            raise QwenlabError(f"{source}: set 'steps' > 0 or 'epochs' > 0")
        known = _linear_modules()
        unknown = [m for m in self.target_modules if m not in known]
        if unknown or not self.target_modules:
            raise QwenlabError(f"{source}: 'target_modules': unknown module(s) {', '.join(unknown) or '(none given)'}; "
                               f"choose from {', '.join(known)}")
        unknown_loss = [t for t in self.dpo_loss if t not in DPO_LOSS_TYPES]
        if unknown_loss or not self.dpo_loss:
            raise QwenlabError(f"{source}: 'dpo_loss': unknown term(s) {', '.join(unknown_loss) or '(none given)'}; "
                               f"choose from {', '.join(DPO_LOSS_TYPES)}")
        if self.engine not in ENGINES:
            raise QwenlabError(f"{source}: 'engine' must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.dtype not in ("fp32", "float32", "bf16", "bfloat16"):
            raise QwenlabError(f"{source}: 'dtype' must be fp32 or bf16 (fp16 is not supported on CPU), "
                               f"got {self.dtype!r}")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def _check_output_parent(out: Path, source: str) -> None:
    """Fail before the model loads when `out` cannot be created: its nearest existing ancestor is a file."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise QwenlabError(f"{source}: 'out' {out}: {parent} is not a folder, so the output cannot be written there")


# ---- YAML and flags ------------------------------------------------------------------------
def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in fields(TrainConfig):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
            hint = args[0]
        out[f.name] = list if typing.get_origin(hint) is list else hint
    return out


def _coerce(name: str, value, kind: type, source: str):
    if value is None:
        return None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1"):
                return True
            if str(value).lower() in ("false", "no", "0"):
                return False
            raise ValueError
        if kind is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(v).strip() for v in items if str(v).strip()]
        if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise QwenlabError(f"{source}: '{name}' must be {kind.__name__}, got {value!r}") from None


def load_train_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Fields from a YAML file (if given), then `overrides` (flags; None values are ignored)."""
    values: dict = {}
    types_ = _field_types()
    source = "flags"
    if path:
        path = Path(path)
        source = str(path)
        loaded = read_yaml(path, "YAML config file") or {}
        if not isinstance(loaded, dict):
            raise QwenlabError(f"{path}: expected a mapping of training options")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in types_:
                raise QwenlabError(f"{path}: unknown key '{key}'; known keys: {', '.join(types_)}")
            values[name] = _coerce(name, value, types_[name], source)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, types_[name], "flags")
    return TrainConfig(**values).validate(source)


DPO_ONLY = ("beta", "dpo_loss")
SFT_ONLY = ("replay", "replay_prompts", "replay_tasks", "replay_answers")  # fields that mean nothing to SFT: `train sft --help` does not list them


def add_config_flags(parser, trainer: str | None = None) -> None:
    """One flag per TrainConfig field that applies to `trainer` (--lora-r, --no-progress, ...), all
    defaulting to None (a config file's value, else the field's default, shown in --help)."""
    import argparse
    from dataclasses import MISSING

    types_ = _field_types()
    for f in fields(TrainConfig):
        if (trainer == "sft" and f.name in DPO_ONLY) or (trainer == "dpo" and f.name in SFT_ONLY):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = types_[f.name]
        help_text = f.metadata.get("help", "")
        if f.default not in (MISSING, None, "", False) and "default" not in help_text:
            shown = ",".join(map(str, f.default)) if isinstance(f.default, (list, tuple)) else f.default
            help_text += f" (default: {shown})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            suffix = " (comma-separated)" if kind is list else ""
            parser.add_argument(flag, dest=f.name, default=None, help=help_text + suffix)


def config_overrides(args) -> dict:
    return {f.name: getattr(args, f.name, None) for f in fields(TrainConfig)}
