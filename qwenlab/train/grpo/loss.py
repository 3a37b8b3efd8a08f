"""The GRPO objective as TRL's GRPOTrainer computes it (defaults: loss_type="dapo", scale_rewards="group").

Group-relative advantage (Shao et al. 2024, DeepSeekMath), for G completions of one prompt:
    A_i = (r_i - mean(r)) / (std(r) + 1e-4)                       std with Bessel's correction, as torch/TRL

Per completion token t (ratio ρ = exp(log π(t) - log π_old(t)), one policy update per batch so
π_old = π detached and ρ = 1 with the gradient of log π):
    ℓ_t = -min(ρ·A, clip(ρ, 1-ε, 1+ε)·A) + β·KL_t
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (Schulman's k3 estimator)
Loss = Σ ℓ_t over all completion tokens of the batch / number of those tokens ("dapo": token-level
normalisation, so long completions are not down-weighted per token).
These are pure functions; trl/trainer/grpo_trainer.py `_compute_loss` is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """rewards [N·G] (grouped consecutively) -> advantages [N·G]."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((grouped - mean) / (std + eps)).view(-1)


@dataclass
class PackedBatch:
    """Prompt + completion rows, right-padded. `completion_mask[b, t]` marks targets t+1 in the completion."""

    tokens: torch.Tensor  # [B, T] long
    completion_mask: torch.Tensor  # [B, T-1] float, aligned with next-token log-probs
    advantages: torch.Tensor  # [B]


def pack_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], advantages: torch.Tensor,
               pad_id: int) -> PackedBatch:
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    length = max(len(r) for r in rows)
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length - 1)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        tokens[b, :len(p) + len(c)] = torch.tensor(p + c)
        mask[b, len(p) - 1:len(p) + len(c) - 1] = 1.0  # logits at position t predict token t+1
    return PackedBatch(tokens, mask, advantages)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(token t+1 | ≤ t) for every position: logits [B, T, V], tokens [B, T] -> [B, T-1].

    Logits are divided by the sampling temperature first, as TRL does, so the log-probs are those
    of the distribution the completions were drawn from.
    """
    logits = logits[:, :-1].float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    return torch.gather(F.log_softmax(logits, dim=-1), 2, tokens[:, 1:, None]).squeeze(-1)


def grpo_loss(logprobs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, *,
              old_logprobs: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None,
              beta: float = 0.0, epsilon: float = 0.2, num_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """The GRPO loss over [B, T] per-token log-probs; returns (loss, {"kl": mean KL per token}).

    num_tokens: the normaliser (completion tokens in the whole batch), for gradient accumulation
    over micro-batches; default: the tokens in `mask`.
    """
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logprobs - old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, clipped * a)
    kl = torch.zeros((), dtype=logprobs.dtype)
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        delta = ref_logprobs - logprobs
        per_token_kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * per_token_kl
        kl = (per_token_kl * mask).sum().detach() / mask.sum().clamp(min=1.0)
    normaliser = mask.sum().clamp(min=1.0) if num_tokens is None else max(float(num_tokens), 1.0)
    return (per_token * mask).sum() / normaliser, {"kl": float(kl)}
