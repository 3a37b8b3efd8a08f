"""SFT examples as token ids and loss masks, made as TRL's SFTTrainer makes them, and the batches of a run.

TRL 1.x (trl/trainer/sft_trainer.py: add_eos, tokenize_fn, build_labels, truncate; the collator pads):
- chat prompt/completion: ids = template(prompt + completion); the loss falls on the ids after their common
  prefix with template(prompt, add_generation_prompt=True);
- plain-text prompt/completion: ids = tokens(prompt + completion + eos); the loss after the common prefix
  with tokens(prompt);
- plain text: ids = tokens(text + eos); the loss on every token;
- the first max_length ids are kept, and an example left with no target is dropped.
The same tokenizer (transformers' AutoTokenizer of the base) makes the ids, so an example is the same
token sequence under either engine; tests/train/test_native_sft.py holds it to TRL's own dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenlab.train.data import common_prefix


@dataclass
class Example:
    ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target


def token_ids(encoded) -> list[int]:
    # apply_chat_template(return_dict=True) and __call__ both return a mapping with input_ids
    return list(encoded["input_ids"])


def with_eos(text: str, eos: str) -> str:
    """TRL's add_eos: a text completion ends with the tokenizer's EOS."""
    return text + eos if eos and not text.endswith(eos) else text


def render_ids(tokenizer, prompt, completion=None) -> list[int]:
    """The ids of a prompt (chat messages: with the generation prompt) or of prompt + completion, as TRL renders
    them: chat messages through the chat template, text through the tokenizer."""
    if isinstance(prompt, list):  # chat messages
        if completion is None:
            return token_ids(tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                                           add_generation_prompt=True))
        return token_ids(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True))
    return token_ids(tokenizer(text=prompt if completion is None else prompt + completion))


def tokenize_example(record: dict, tokenizer, max_length: int) -> Example:
    """One record (prompt/completion, chat or text, or text) as ids and loss mask."""
    eos = tokenizer.eos_token or ""
    if "prompt" in record:
        completion = record["completion"]
        if not isinstance(record["prompt"], list):
            completion = with_eos(completion, eos)
        prompt = render_ids(tokenizer, record["prompt"])
        ids = render_ids(tokenizer, record["prompt"], completion)
        shared = common_prefix(prompt, ids)
        mask = [0] * shared + [1] * (len(ids) - shared)
    else:
        ids = render_ids(tokenizer, with_eos(record["text"], eos))
        mask = [1] * len(ids)
    return Example(ids[:max_length], mask[:max_length])


def tokenize_examples(records: list[dict], tokenizer, max_length: int) -> list[Example]:
    """Every record's example, less those with no target left after truncation (TRL drops them too)."""
    examples = (tokenize_example(record, tokenizer, max_length) for record in records)
    return [e for e in examples if any(e.loss_mask)]


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The order of the examples in one epoch, transformers' Trainer's own: accelerate's SeedableRandomSampler
    draws randperm(count) from a generator seeded with seed + epoch. A resumed run continues it from any step."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(count, generator=generator).tolist()


def step_examples(count: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The example indices of optimizer micro-batch `step` (0-based): epochs of `count` examples in batches
    of `batch_size`, the last batch of an epoch smaller (transformers' drop_last=False)."""
    per_epoch = -(-count // batch_size)
    epoch, index = divmod(step, per_epoch)
    return epoch_order(count, seed, epoch)[index * batch_size:(index + 1) * batch_size]


def step_batches(count: int, batch_size: int, accum: int, seed: int, step: int) -> list[list[int]]:
    """The example indices of each micro-batch of optimizer step `step` (0-based), as transformers' Trainer
    accumulates: an epoch's batches in groups of `accum`, its last group shorter when they do not divide (an
    update never spans two epochs)."""
    per_epoch = -(-count // batch_size)
    epoch, update = divmod(step, -(-per_epoch // accum))
    first = update * accum
    return [step_examples(count, batch_size, seed, epoch * per_epoch + i)
            for i in range(first, min(first + accum, per_epoch))]


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] right-padded
    target_mask: torch.Tensor  # [B, T-1] float: position t's next token is a target
    real_tokens: int  # non-padding tokens (transformers' num_input_tokens_seen="non_padding")

    @property
    def targets(self) -> int:
        return int(self.target_mask.sum())


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right padding: a causal model's real positions never see it, so no attention mask is needed."""
    width = max(len(e.ids) for e in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), max(width - 1, 0))
    for row, example in enumerate(examples):
        tokens[row, :len(example.ids)] = torch.tensor(example.ids)
        mask[row, :len(example.ids) - 1] = torch.tensor(example.loss_mask[1:], dtype=torch.float32)
    return Batch(tokens, mask, sum(len(e.ids) for e in examples))
