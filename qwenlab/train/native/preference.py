"""Preference pairs for `train dpo --engine native`: TRL's DPOTrainer's tokens, truncation and batches.

A record {"prompt", "chosen", "rejected"} (chat messages or text, train/data.py's normal form) becomes prompt,
chosen and rejected ids as TRL 1.x prepares them: the prompt rendered with the generation prompt, each completion
as what follows the shared prefix of prompt and prompt + completion (text completions end with EOS). A batch of B
pairs is 2B right-padded rows, the chosen first, each cut to max_length from its start (TRL's "keep_start");
pairs whose prompt alone fills max_length are dropped, as TRL drops them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenlab.train.data import common_prefix
from qwenlab.train.native.batches import Example, collate, render_ids, with_eos


@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def tokenize_pair(record: dict, tokenizer) -> Pair:
    chosen, rejected = record["chosen"], record["rejected"]
    if not isinstance(record["prompt"], list):
        eos = tokenizer.eos_token or ""
        chosen, rejected = with_eos(chosen, eos), with_eos(rejected, eos)
    prompt = render_ids(tokenizer, record["prompt"])
    with_chosen = render_ids(tokenizer, record["prompt"], chosen)
    with_rejected = render_ids(tokenizer, record["prompt"], rejected)
    # the completion starts where prompt and prompt + completion diverge (not always after the prompt)
    shared = min(common_prefix(prompt, with_chosen), common_prefix(prompt, with_rejected))
    return Pair(prompt[:shared], with_chosen[shared:], with_rejected[shared:])


def tokenize_pairs(records: list[dict], tokenizer, max_length: int) -> list[Pair]:
    """Every record's pair, less those whose prompt alone fills max_length (no completion token would be left)."""
    pairs = (tokenize_pair(record, tokenizer) for record in records)
    return [p for p in pairs if len(p.prompt) < max_length]


@dataclass
class PairBatch:
    tokens: torch.Tensor  # [2B, T] right-padded: the B chosen rows, then the B rejected rows
    target_mask: torch.Tensor  # [2B, T-1] float: position t's next token is a completion token
    completion_tokens: torch.Tensor  # [2B]: completion tokens per row (TRL's completion_mask sums)
    real_tokens: int

    @property
    def pairs(self) -> int:
        return self.tokens.shape[0] // 2


def collate_pairs(pairs: list[Pair], pad_id: int, max_length: int) -> PairBatch:
    """batches.collate of the chosen rows then the rejected rows, each cut to max_length from its start."""
    sides = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    rows = [Example((prompt + completion)[:max_length], ([0] * len(prompt) + [1] * len(completion))[:max_length])
            for prompt, completion in sides]
    batch = collate(rows, pad_id)
    completion = torch.tensor([sum(row.loss_mask) for row in rows], dtype=torch.float32)
    return PairBatch(batch.tokens, batch.target_mask, completion, batch.real_tokens)
