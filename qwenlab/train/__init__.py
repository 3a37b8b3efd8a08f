"""Training LoRA adapters on TRL + PEFT + transformers: SFT and DPO, checkpoints, resume, loss curves."""

from qwenlab.train.config import TrainConfig, load_train_config
from qwenlab.train.data import dpo_records_from_task, load_jsonl, sft_records_from_task, write_jsonl

__all__ = ["TrainConfig", "dpo_records_from_task", "load_jsonl", "load_train_config", "sft_records_from_task",
           "train_dpo", "train_sft", "write_jsonl"]


def train_sft(config):
    from qwenlab.train.trainers import train_sft as run  # TRL's import is slow: only when training

    return run(config)


def train_dpo(config):
    from qwenlab.train.trainers import train_dpo as run

    return run(config)
