"""LoRA SFT with TRL's SFTTrainer: the base in fp32, a PEFT LoRA, checkpoints, resume, eval loss.

    result = train_sft(load_train_config("sft.yaml"))

Chat prompt/completion data takes the loss on the completion only; `messages` data on the whole
conversation (TRL's rules). Everything TRL does not need to decide is set in run.trainer_arguments.
"""

from __future__ import annotations

import time

from qwenlab.train.config import TrainConfig
from qwenlab.train.run import (
    TrainResult,
    datasets,
    finish_run,
    load_training_model,
    lora_config,
    open_output,
    prepare_run,
    trainer_arguments,
)


def train_sft(config: TrainConfig) -> TrainResult:
    from trl import SFTConfig, SFTTrainer

    run = prepare_run(config, "sft")
    model, tokenizer = load_training_model(run)
    train_data, eval_data = datasets(run)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**trainer_arguments(run), packing=False),
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=lora_config(config),
    )
    open_output(run)
    started = time.time()
    trainer.train(resume_from_checkpoint=run.resume_from)
    return finish_run(trainer, run, started)
