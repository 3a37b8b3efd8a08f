"""The GRPO objective as TRL's GRPOTrainer computes it (loss_type grpo / dr_grpo / dapo, scale_rewards).

Group-relative advantage (Shao et al. 2024, DeepSeekMath), for G completions of one prompt:
    A_i = (r_i - mean(r)) / (std + 1e-4)       scale_rewards="group": std of the group (Bessel's correction)
                                               "batch": std of every reward in the batch; "none": no division
                                               (Dr. GRPO, Liu et al. 2025: the std division biases by difficulty)
Per completion token t (ratio ρ = exp(log π(t) - log π_old(t)), one policy update per batch so
π_old = π detached and ρ = 1 with the gradient of log π):
    ℓ_t = -min(ρ·A, clip(ρ, 1-ε_low, 1+ε_high)·A) + β·KL_t     (DAPO's asymmetric clip: ε_low 0.2, ε_high 0.28)
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (Schulman's k3 estimator)
Normalisation, over B completions with masks m (a truncated completion is all 0 when masked):
    "grpo"     mean over completions of (Σ_t ℓ_t m_t / Σ_t m_t)      (DeepSeekMath; long answers down-weighted)
    "dr_grpo"  Σ ℓ_t m_t / (B · max_completion_length)                 (Dr. GRPO: a constant normaliser)
    "dapo"     Σ ℓ_t m_t / Σ m_t over the whole batch                   (DAPO: token level; TRL's default)
These are pure functions; trl/trainer/grpo_trainer.py `_compute_loss` is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """rewards [N·G] (grouped consecutively) -> advantages [N·G] (scale_rewards="group")."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((grouped - mean) / (std + eps)).view(-1)


def batch_advantages(groups: list[torch.Tensor], scale_rewards: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Advantages for groups of any sizes, concatenated in order: r - mean(group), scaled as `scale_rewards`."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    centred = torch.cat([g - g.mean() for g in groups])
    if scale_rewards == "group":
        std = torch.cat([g.std().expand(len(g)) if len(g) > 1 else torch.zeros(len(g)) for g in groups])
    elif scale_rewards == "batch":
        every = torch.cat(groups)
        std = every.std().expand(len(every)) if len(every) > 1 else torch.zeros(len(every))
    else:
        return centred
    return centred / (std + eps)


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


class _SelectedLogprobs(torch.autograd.Function):
    """log softmax(h W^T / τ)[target] for rows of h, `chunk` rows at a time; the backward recomputes each chunk's
    logits instead of keeping them. Peak memory is one chunk's [chunk, vocab] logits, not [rows, vocab]."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk):
        out = torch.empty(hidden.shape[0], dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = _chunk_logits(hidden[rows], weight, temperature)
            out[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            logits = _chunk_logits(hidden[rows], weight, ctx.temperature)
            # d logp[target] / d logits = onehot(target) - softmax(logits), then / τ through the division
            grad = torch.softmax(logits, dim=-1).mul_(-grad_out[rows, None])
            grad.scatter_add_(1, targets[rows, None], grad_out[rows, None])
            if ctx.temperature != 1.0:
                grad /= ctx.temperature
            if need_hidden:
                grad_hidden[rows] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight += grad.t() @ hidden[rows].float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = (hidden.to(weight.dtype) @ weight.t()).float()
    return logits / temperature if temperature != 1.0 else logits


LOGPROB_CHUNK_ROWS = 256  # rows of logits alive at once: 256 x 151,936 fp32 = 156 MB on Qwen2.5's vocabulary


def selected_token_logprobs(hidden: torch.Tensor, head_weight: torch.Tensor, tokens: torch.Tensor,
                            mask: torch.Tensor, temperature: float = 1.0,
                            chunk_rows: int = LOGPROB_CHUNK_ROWS) -> torch.Tensor:
    """token_logprobs(logits, tokens) at the positions `mask` [B, T-1] marks, 0 elsewhere, from the final hidden
    states [B, T, H] and the head's weight [V, H]: the head runs on the marked positions only (a completion's,
    not the prompt's), `chunk_rows` at a time, so no [B, T, V] tensor exists in the forward or the backward."""
    picked = mask.bool()
    rows = hidden[:, :-1][picked]  # [N, H]: the positions whose next token is trained on
    targets = tokens[:, 1:][picked]
    out = torch.zeros(mask.shape, dtype=torch.float32)
    if rows.shape[0]:
        out = out.masked_scatter(picked, _SelectedLogprobs.apply(rows, head_weight, targets, float(temperature),
                                                                 int(chunk_rows)))
    return out


def grpo_loss(logprobs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, *,
              old_logprobs: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None,
              beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None,
              loss_type: str = "dapo", num_tokens: float | None = None, num_rows: int | None = None,
              max_completion_length: int | None = None) -> tuple[torch.Tensor, dict]:
    """The GRPO loss over [B, T] per-token log-probs; returns (loss, {"kl": mean KL per token}).

    For gradient accumulation over micro-batches, the normalisers are the whole batch's:
    num_tokens (masked completion tokens, "dapo") and num_rows (completions, "grpo"/"dr_grpo");
    default: those of this call. epsilon_high None means epsilon (a symmetric clip).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logprobs - old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
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
    rows = logprobs.shape[0] if num_rows is None else num_rows
    if loss_type == "grpo":
        per_row = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_row.sum() / max(rows, 1), {"kl": float(kl)}
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        return (per_token * mask).sum() / (max(rows, 1) * max_completion_length), {"kl": float(kl)}
    normaliser = mask.sum().clamp(min=1.0) if num_tokens is None else max(float(num_tokens), 1.0)
    return (per_token * mask).sum() / normaliser, {"kl": float(kl)}
