"""How far a quantized model's logits are from its float model's, on the same token sequences.

Figures (per position, over every sequence):
  rel_rms_error   ||logits_q - logits_f|| / ||logits_f||
  max_abs_error   max |logits_q - logits_f|
  top1_agreement  share of positions whose argmax is the same
  kl              mean KL(p_f || p_q) of the next-token distributions, in nats
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def reference_logits(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """The float model's logits, computed once and compared with many variants."""
    return [model(torch.tensor([ids]))[0].float() for ids in sequences]


@torch.inference_mode()
def compare_logits(reference, candidate, sequences: list[list[int]]) -> dict[str, float]:
    """reference: the float model, or its `reference_logits` for these sequences."""
    if not isinstance(reference, list):
        reference = reference_logits(reference, sequences)
    squared_error = squared_norm = kl = 0.0
    max_abs, agree, positions = 0.0, 0, 0
    for ids, f in zip(sequences, reference):
        q = candidate(torch.tensor([ids]))[0].float()
        squared_error += float((q - f).pow(2).sum())
        squared_norm += float(f.pow(2).sum())
        max_abs = max(max_abs, float((q - f).abs().max()))
        agree += int((q.argmax(-1) == f.argmax(-1)).sum())
        log_p, log_q = f.log_softmax(-1), q.log_softmax(-1)
        kl += float((log_p.exp() * (log_p - log_q)).sum())
        positions += len(ids)
    return {"rel_rms_error": (squared_error / squared_norm) ** 0.5, "max_abs_error": max_abs,
            "top1_agreement": agree / positions, "kl": kl / positions}


def random_sequences(vocab: int, count: int = 8, length: int = 64, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=g).tolist()
