"""Task arithmetic, and the engine the TIES / DARE / breadcrumbs / DELLA methods share."""

from __future__ import annotations

from typing import Callable

import torch

from qwenlab.merge.methods.elementwise import chunks, difference, one_thread, to_float32
from qwenlab.merge.methods.spec import MergeMethod, Parameter

# sparsify(delta, model_index, params) -> the kept part of the task vector
Sparsifier = Callable[[torch.Tensor, int, dict], torch.Tensor]


def combine_task_vectors(tensors: list[torch.Tensor], params: dict, *, sparsify: Sparsifier | None = None,
                         elect_sign: bool = False) -> torch.Tensor:
    """out = base + λ · Σᵢ mᵢ·wᵢ·δ̂ᵢ / D, with δᵢ = xᵢ − base and δ̂ᵢ its sparsified form.

    Weights apply before the sign election. With elect_sign (TIES), the elected sign is
    s = sign(Σᵢ wᵢ·δ̂ᵢ) (0 counts as +) and mᵢ = [sign(wᵢ·δ̂ᵢ) = s], so trimmed zeros never vote;
    otherwise mᵢ = 1. D = Σᵢ mᵢ·wᵢ per entry when normalize (0 → 1), else 1. This is mergekit's
    generalized task arithmetic, term for term.
    """
    base, models = to_float32(tensors[0]), tensors[1:]
    if not models:
        return base.clone()
    weighted = []
    for index, (model, weight) in enumerate(zip(models, params["weight"])):
        delta = difference(model, base)
        if sparsify is not None:
            delta = sparsify(delta, index, params)  # needs the whole tensor (ranks, norms)
        weighted.append(delta.mul_(weight))
    result = torch.empty(base.shape, dtype=params.get("out_dtype", torch.float32))
    flat_result, flat_base = result.view(-1), base.reshape(-1)
    with one_thread():  # the rest is elementwise: chunk by chunk, in cache
        for part in chunks(result.numel()):
            deltas = [delta.view(-1)[part] for delta in weighted]
            mixed = _combine_chunk(deltas, params, elect_sign)
            flat_result[part].copy_(mixed.add_(flat_base[part]))  # float32 sum, rounded once
    return result


def _combine_chunk(deltas: list[torch.Tensor], params: dict, elect_sign: bool) -> torch.Tensor:
    """λ · Σᵢ mᵢ·wᵢδ̂ᵢ / D for one chunk of the weighted task vectors wᵢδ̂ᵢ.

    Masks are arithmetic on ±1 signs rather than bool tensors: torch's bool select/mix ops are
    10-40x slower per entry than float ones here, and the result is the same to the bit.
    """
    weights = params["weight"]
    mixed = deltas[0].clone()
    for delta in deltas[1:]:
        mixed.add_(delta)  # in order, as mergekit's sum over the stacked deltas
    if elect_sign:
        sign = torch.sign(mixed)
        elected = sign.abs().neg_().add_(1).add_(sign)  # +1 where the total is ≥ 0 (or −0), else −1
        mixed.zero_()
        divisor = torch.zeros_like(mixed)
        for delta, weight in zip(deltas, weights):
            agreeing = (delta * elected).clamp_min_(0)  # |δ| where δ has the elected sign, else 0
            divisor.add_(torch.sign(agreeing), alpha=weight)
            mixed.add_(agreeing.mul_(elected))
        divisor.add_(torch.sign(divisor.abs()).neg_().add_(1))  # 0 -> 1
    else:
        total = sum(weights)
        divisor = total if abs(total) >= 1e-8 else 1.0
    if params["normalize"]:
        mixed.div_(divisor)
    if params["lambda"] != 1:
        mixed.mul_(params["lambda"])
    return mixed


def merge_task_arithmetic(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
    """out = base + λ · Σᵢ wᵢ·(xᵢ − base) (÷ Σᵢ wᵢ if normalize). Ilharco et al. 2023,
    "Editing models with task arithmetic" (arXiv:2212.04089)."""
    return combine_task_vectors(tensors, params)


def task_vector_parameters(*, normalize: bool, rescale: bool) -> tuple[Parameter, ...]:
    """The parameters every method of the family takes (with this method's defaults)."""
    return (
        Parameter("weight", float, "non_base", description="the task vector's weight"),
        Parameter("density", float, "non_base", default=1.0, low=0.0, high=1.0, low_open=True,
                  description="fraction of the task vector kept"),
        Parameter("normalize", bool, default=normalize, description="divide by the sum of weights"),
        Parameter("rescale", bool, default=rescale, description="restore the L1 norm after sparsifying"),
        Parameter("lambda", float, default=1.0, description="scale of the merged task vector"),
        Parameter("int8_mask", bool, default=False, description="memory option in mergekit; no effect here"),
    )


METHOD = MergeMethod(
    name="task_arithmetic",
    function=merge_task_arithmetic,
    parameters=task_vector_parameters(normalize=False, rescale=False),
    base="required",
    min_models=0,
    reference="https://arxiv.org/abs/2212.04089",
    takes_float32_inputs=False,
)
