"""TIES-merging: trim each task vector to its largest entries, elect a sign, merge the agreeing part."""

from __future__ import annotations

import torch

from qwenlab.merge.methods.sparsify import keep_largest_
from qwenlab.merge.methods.spec import MergeMethod
from qwenlab.merge.methods.task_arithmetic import combine_task_vectors, task_vector_parameters


def _trim(delta: torch.Tensor, index: int, params: dict) -> torch.Tensor:
    return keep_largest_(delta, params["density"][index], rescale=params["rescale"])


def merge_ties(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
    """δ̂ᵢ = top-k(xᵢ − base) with k = max(1, ⌊densityᵢ·n⌋); s = sign(Σᵢ wᵢ·δ̂ᵢ) (electing by total
    magnitude, 0 → +); out = base + λ · Σᵢ [sign(wᵢδ̂ᵢ) = s]·wᵢ·δ̂ᵢ / Σᵢ [sign(wᵢδ̂ᵢ) = s]·wᵢ.

    Yadav et al. 2023, "TIES-Merging: Resolving interference when merging models"
    (arXiv:2306.01708), with mergekit's per-model weights applied before the election.
    """
    return combine_task_vectors(tensors, params, sparsify=_trim, elect_sign=True)


METHOD = MergeMethod(
    name="ties",
    function=merge_ties,
    parameters=task_vector_parameters(normalize=True, rescale=False),
    base="required",
    min_models=0,
    takes_float32_inputs=False,
    reference="https://arxiv.org/abs/2306.01708",
)
