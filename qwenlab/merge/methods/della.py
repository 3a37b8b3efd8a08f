"""DELLA: magnitude-aware random drop (MagPrune) of task vectors, then a TIES-style or linear merge."""

from __future__ import annotations

import torch

from qwenlab.merge.methods.sparsify import keep_random_by_rank_
from qwenlab.merge.methods.spec import MergeMethod, Parameter
from qwenlab.merge.methods.task_arithmetic import combine_task_vectors, task_vector_parameters


def _magprune(delta: torch.Tensor, index: int, params: dict) -> torch.Tensor:
    return keep_random_by_rank_(delta, params["density"][index], params["epsilon"][index],
                               params["seeds"][index], rescale=params["rescale"])


def merge_della(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
    """Each entry of δᵢ = xᵢ − base is kept with probability (densityᵢ − ε) + 2ε·r, r its |δ| rank
    within its row scaled to [0, 1]; L1 rescale; then TIES's sign election and agreeing sum.

    Deep et al. 2024, "DELLA-Merging" (arXiv:2406.11617), as mergekit implements it.
    """
    return combine_task_vectors(tensors, params, sparsify=_magprune, elect_sign=True)


def merge_della_linear(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
    """δ̂ᵢ as in della (MagPrune); out = base + λ · Σᵢ wᵢ·δ̂ᵢ (÷ Σᵢ wᵢ if normalize), no sign election.
    Deep et al. 2024 (arXiv:2406.11617)."""
    return combine_task_vectors(tensors, params, sparsify=_magprune)


_EPSILON = Parameter("epsilon", float, "non_base", default=0.15, low=0.0, high=1.0,
                     description="spread of keep probabilities around density")

DELLA = MergeMethod(
    name="della",
    function=merge_della,
    parameters=task_vector_parameters(normalize=True, rescale=True) + (_EPSILON,),
    base="required",
    min_models=0,
    takes_float32_inputs=False,
    reference="https://arxiv.org/abs/2406.11617",
    uses_seed=True,
)

DELLA_LINEAR = MergeMethod(
    name="della_linear",
    function=merge_della_linear,
    parameters=task_vector_parameters(normalize=False, rescale=True) + (_EPSILON,),
    base="required",
    min_models=0,
    takes_float32_inputs=False,
    reference="https://arxiv.org/abs/2406.11617",
    uses_seed=True,
)
