"""GRPO with LoRA on verifiable tasks: rollouts on the project's engine, TRL's loss, checkpoints and resume."""

from qwenlab.train.grpo.loss import group_advantages, grpo_loss
from qwenlab.train.grpo.rollouts import Rollout, draw_instances, generate_rollouts, score_completions
from qwenlab.train.grpo.trainer import GRPOConfig, GRPOLearner, has_checkpoint, run_grpo

__all__ = ["GRPOConfig", "GRPOLearner", "Rollout", "draw_instances", "generate_rollouts", "group_advantages",
           "grpo_loss", "has_checkpoint", "run_grpo", "score_completions"]
