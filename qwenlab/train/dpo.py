"""LoRA DPO with TRL's DPOTrainer: the policy is base + LoRA, the reference the same base with the
adapter switched off (no second model in memory). Preference data: prompt/chosen/rejected.

    result = train_dpo(load_train_config("dpo.yaml"))
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


def train_dpo(config: TrainConfig) -> TrainResult:
    from trl import DPOConfig, DPOTrainer

    run = prepare_run(config, "dpo")
    model, tokenizer = load_training_model(run)
    train_data, eval_data = datasets(run)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,  # with a PEFT model TRL uses the base (adapter disabled) as the reference
        args=DPOConfig(**trainer_arguments(run), beta=config.beta, loss_type=list(config.dpo_loss)),
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=lora_config(config),
    )
    open_output(run)
    started = time.time()
    trainer.train(resume_from_checkpoint=run.resume_from)
    return finish_run(trainer, run, started)
