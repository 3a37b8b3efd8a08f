"""DARE: drop task-vector entries at random and rescale, then add (dare_linear) or TIES-merge (dare_ties)."""

from __future__ import annotations

import torch

from qwenlab.merge.methods.sparsify import keep_random_
from qwenlab.merge.methods.spec import MergeMethod
from qwenlab.merge.methods.task_arithmetic import combine_task_vectors, task_vector_parameters


def _drop(delta: torch.Tensor, index: int, params: dict) -> torch.Tensor:
    return keep_random_(delta, params["density"][index], params["seeds"][index], rescale=params["rescale"])


def merge_dare_linear(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
    """δ̂ᵢ = mᵢ ⊙ (xᵢ − base), mᵢ ~ Bernoulli(densityᵢ), rescaled so ‖δ̂ᵢ‖₁ = ‖δᵢ‖₁ (mergekit's
    rescale; the paper divides by densityᵢ); out = base + λ · Σᵢ wᵢ·δ̂ᵢ (÷ Σᵢ wᵢ if normalize).

    Yu et al. 2024, "Language models are Super Mario" (arXiv:2311.03099). Masks come from
    params["seeds"], one per model, derived from the tensor name: order-independent results.
    """
    return combine_task_vectors(tensors, params, sparsify=_drop)


def merge_dare_ties(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
    """δ̂ᵢ as in dare_linear; s = sign(Σᵢ wᵢ·δ̂ᵢ); out = base + λ · Σᵢ [sign(wᵢδ̂ᵢ) = s]·wᵢ·δ̂ᵢ
    (÷ Σᵢ [sign(wᵢδ̂ᵢ) = s]·wᵢ if normalize). Yu et al. 2024 (arXiv:2311.03099) with TIES's election
    (Yadav et al. 2023, arXiv:2306.01708)."""
    return combine_task_vectors(tensors, params, sparsify=_drop, elect_sign=True)


DARE_LINEAR = MergeMethod(
    name="dare_linear",
    function=merge_dare_linear,
    parameters=task_vector_parameters(normalize=False, rescale=True),
    base="required",
    min_models=0,
    takes_float32_inputs=False,
    reference="https://arxiv.org/abs/2311.03099",
    uses_seed=True,
)

DARE_TIES = MergeMethod(
    name="dare_ties",
    function=merge_dare_ties,
    parameters=task_vector_parameters(normalize=False, rescale=True),
    base="required",
    min_models=0,
    takes_float32_inputs=False,
    reference="https://arxiv.org/abs/2311.03099",
    uses_seed=True,
)
