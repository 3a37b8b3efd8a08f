"""Model Stock: move from the base toward the average of the fine-tunes by an angle-derived ratio."""

from __future__ import annotations

import torch

from qwenlab.merge.methods.spec import MergeMethod, Parameter


def merge_model_stock(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
    """out = t·mean(xᵢ) + (1 − t)·base, t = N·c / (1 + (N − 1)·c), c the mean pairwise cosine of
    the task vectors xᵢ − base (per row when filter_wise); t = 0 where 1 + (N−1)c ≈ 0.

    Jang et al. 2024, "Model Stock: all we need is just a few fine-tuned models"
    (arXiv:2403.19522); needs a base and at least two other models.
    """
    base, models = tensors[0], tensors[1:]
    shape = base.shape
    if params["filter_wise"]:
        base = base.unsqueeze(0) if base.dim() == 1 else base
        models = [m.unsqueeze(0) if m.dim() == 1 else m for m in models]
    else:
        base, models = base.reshape(-1), [m.reshape(-1) for m in models]
    offsets = [model - base for model in models]
    cosines = []
    for index, first in enumerate(offsets):
        for second in offsets[index + 1:]:
            norms = torch.linalg.vector_norm(first, dim=-1) * torch.linalg.vector_norm(second, dim=-1)
            cosines.append(((first * second).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cosine = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(models)
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cosine),
                        count * cosine / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(models) / count
    return (ratio * average + (1 - ratio) * base).reshape(shape)


METHOD = MergeMethod(
    name="model_stock",
    function=merge_model_stock,
    parameters=(Parameter("filter_wise", bool, default=False, description="one ratio per row"),),
    base="required",
    min_models=2,
    reference="https://arxiv.org/abs/2403.19522",
)
