"""LoRA DPO on qwenlab's own model core (`train dpo --engine native`): TRL's DPOTrainer's run, less work per step.

The same as the TRL engine: the pairs (preference.py), PEFT's LoRA init, the Trainer's batch order, AdamW and the
schedule, clipping, and the loss: for each pair, with log-ratios r = log π(y|x) − log π_ref(y|x) summed over the
completion's tokens, the terms of `dpo_loss` summed, each the mean over the micro-batch's pairs, and each
micro-batch's loss divided by grad_accum. The reference is the base with the adapter switched off (no copy).
What it saves, as native SFT does: the head runs on completion positions only (no [2B, T, vocab] logits), the
reference pass runs without autograd, the MLP is fused, and bf16 bases are supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwenlab.adapters import active_adapters
from qwenlab.train.native.preference import PairBatch, collate_pairs, tokenize_pairs
from qwenlab.train.native.sft import NativeSFT

NATIVE_DPO_LOSSES = ("sigmoid", "hinge", "ipo", "sft")  # TRL's loss_type terms this engine computes


def preference_loss(logprobs: torch.Tensor, target_mask: torch.Tensor, ref_logps: torch.Tensor,
                    completion_tokens: torch.Tensor, terms: list[str], beta: float) -> tuple[torch.Tensor, dict]:
    """TRL 1.x DPOTrainer's loss for 2B rows (B chosen, then B rejected). logprobs, target_mask [2B, T-1]: the
    policy's per-token log-probs and where the completion's tokens are; ref_logps [2B]: the reference's summed
    log-probs; completion_tokens [2B]: each row's completion length (ipo averages over it)."""
    logps = (logprobs * target_mask).sum(dim=1)
    chosen, rejected = (logps - ref_logps).chunk(2)
    delta = chosen - rejected
    loss = torch.zeros((), dtype=logps.dtype)
    for term in terms:
        if term == "sigmoid":
            per_pair = -F.logsigmoid(beta * delta)
        elif term == "hinge":
            per_pair = torch.relu(1 - beta * delta)
        elif term == "ipo":  # TRL normalises the log-ratios by completion length
            chosen_tokens, rejected_tokens = completion_tokens.chunk(2)
            average = chosen / chosen_tokens.clamp(min=1.0) - rejected / rejected_tokens.clamp(min=1.0)
            per_pair = (average - 1 / (2 * beta)) ** 2
        elif term == "sft":  # the NLL of the chosen completions' tokens
            pairs = delta.shape[0]
            per_pair = -logprobs[:pairs][target_mask[:pairs].bool()].mean().expand(pairs)
        else:
            raise ValueError(f"the native engine has no DPO loss term {term!r}; it has {', '.join(NATIVE_DPO_LOSSES)}")
        loss = loss + per_pair.mean()
    rewards_chosen, rewards_rejected = beta * chosen.detach(), beta * rejected.detach()
    stats = {"rewards/chosen": float(rewards_chosen.mean()), "rewards/rejected": float(rewards_rejected.mean()),
             "rewards/accuracies": float((rewards_chosen > rewards_rejected).float().mean()),
             "rewards/margins": float((rewards_chosen - rewards_rejected).mean())}
    return loss, stats


class NativeDPO(NativeSFT):
    """NativeSFT's model, LoRA, optimizer, schedule, checkpoints and loop, on preference pairs."""

    def tokenize(self, records: list[dict]) -> list:
        return tokenize_pairs(records, self.tokenizer, self.config.max_length)

    def collate(self, pairs: list) -> PairBatch:
        return collate_pairs(pairs, self.pad_id, self.config.max_length)

    def pair_loss(self, batch: PairBatch) -> tuple[torch.Tensor, dict]:
        with torch.no_grad(), active_adapters(self.model, None):  # the reference: the base alone
            ref_logps = (self.token_logprobs(batch.tokens, batch.target_mask) * batch.target_mask).sum(dim=1)
        logprobs = self.token_logprobs(batch.tokens, batch.target_mask)
        return preference_loss(logprobs, batch.target_mask, ref_logps, batch.completion_tokens,
                               list(self.config.dpo_loss), self.config.beta)

    def backward(self, batches: list[PairBatch]) -> tuple[float, int]:
        total, self.last_stats = 0.0, {}
        for batch in batches:
            loss, stats = self.pair_loss(batch)
            loss = loss / len(batches)
            loss.backward()
            total += float(loss.detach())
            for key, value in stats.items():
                self.last_stats[key] = self.last_stats.get(key, 0.0) + value / len(batches)
        return total, sum(b.pairs for b in batches)

    def eval_batch(self, batch: PairBatch) -> tuple[float, int]:
        """The batch's DPO loss weighted by its pairs, as the Trainer averages eval losses."""
        loss, _ = self.pair_loss(batch)
        return float(loss) * batch.pairs, batch.pairs
