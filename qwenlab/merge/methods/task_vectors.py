"""The task-vector family as rows of one table: task arithmetic, TIES, DARE, breadcrumbs, DELLA.

Every method here is the same pipeline over task vectors δᵢ = xᵢ − base (mergekit's generalized task
arithmetic, term for term):

    δ̂ᵢ = sparsify(δᵢ)                                  (a row's sparsifier; none keeps δᵢ)
    mᵢ = [sign(wᵢ·δ̂ᵢ) = s], s = sign(Σᵢ wᵢ·δ̂ᵢ) (0 → +)   (consensus "sign"; otherwise mᵢ = 1)
    out = base + λ · Σᵢ mᵢ·wᵢ·δ̂ᵢ / D                      (D = Σᵢ mᵢ·wᵢ per entry if normalize, else 1)

A row states its sparsifier, its consensus rule, its defaults and extra parameters; a new method of
the family is one row in FAMILY.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qwenlab.merge.methods.elementwise import chunks, difference, one_thread, to_float32
from qwenlab.merge.methods.sparsify import keep_largest_, keep_middle_, keep_random_, keep_random_by_rank_
from qwenlab.merge.methods.spec import MergeMethod, Parameter

# sparsify(delta, model_index, params) -> the kept part of the task vector (in place)
Sparsifier = Callable[[torch.Tensor, int, dict], torch.Tensor]

SPARSIFIERS: dict[str, Sparsifier] = {
    "magnitude": lambda d, i, p: keep_largest_(d, p["density"][i], rescale=p["rescale"]),
    "random": lambda d, i, p: keep_random_(d, p["density"][i], p["seeds"][i], rescale=p["rescale"]),
    "band": lambda d, i, p: keep_middle_(d, p["density"][i], p["gamma"][i], rescale=p["rescale"]),
    "rank_random": lambda d, i, p: keep_random_by_rank_(d, p["density"][i], p["epsilon"][i], p["seeds"][i],
                                                       rescale=p["rescale"]),
}
SPARSIFIER_FORMULAS = {
    None: "δ̂ᵢ = δᵢ",
    "magnitude": "δ̂ᵢ = top-k(δᵢ), k = max(1, ⌊densityᵢ·n⌋) largest |δ| (TIES trim)",
    "random": "δ̂ᵢ = mᵢ ⊙ δᵢ, mᵢ ~ Bernoulli(densityᵢ) from the tensor's seed (DARE)",
    "band": "δ̂ᵢ = the ⌊densityᵢ·n⌋ entries just below the ⌊gammaᵢ·n⌋ largest |δᵢ| (breadcrumbs)",
    "rank_random": "δ̂ᵢ = mᵢ ⊙ δᵢ, P(keep) = densityᵢ − ε + 2ε·(rank of |δ| in its row) (DELLA MagPrune)",
}
SEEDED = {"random", "rank_random"}  # the executor passes a per-tensor seed for these

GAMMA = Parameter("gamma", float, "non_base", default=0.01, low=0.0, high=1.0,
                  description="fraction of largest entries removed")
EPSILON = Parameter("epsilon", float, "non_base", default=0.15, low=0.0, high=1.0,
                    description="spread of keep probabilities around density")


@dataclass(frozen=True)
class TaskVectorMethod:
    name: str
    sparsifier: str | None  # a key of SPARSIFIERS, or None: the whole task vector
    consensus: str | None  # "sign" (TIES's election) or None
    normalize: bool  # default of the `normalize` parameter
    rescale: bool  # default of the `rescale` parameter (restore the L1 norm after sparsifying)
    reference: str
    extra: tuple[Parameter, ...] = ()


FAMILY = (
    TaskVectorMethod("task_arithmetic", None, None, False, False, "https://arxiv.org/abs/2212.04089"),
    TaskVectorMethod("ties", "magnitude", "sign", True, False, "https://arxiv.org/abs/2306.01708"),
    TaskVectorMethod("dare_linear", "random", None, False, True, "https://arxiv.org/abs/2311.03099"),
    TaskVectorMethod("dare_ties", "random", "sign", False, True, "https://arxiv.org/abs/2311.03099"),
    TaskVectorMethod("breadcrumbs", "band", None, False, False, "https://arxiv.org/abs/2312.06795", (GAMMA,)),
    TaskVectorMethod("breadcrumbs_ties", "band", "sign", False, False, "https://arxiv.org/abs/2312.06795", (GAMMA,)),
    TaskVectorMethod("della", "rank_random", "sign", True, True, "https://arxiv.org/abs/2406.11617", (EPSILON,)),
    TaskVectorMethod("della_linear", "rank_random", None, False, True, "https://arxiv.org/abs/2406.11617", (EPSILON,)),
)


def combine_task_vectors(tensors: list[torch.Tensor], params: dict, *, sparsify: Sparsifier | None = None,
                         elect_sign: bool = False) -> torch.Tensor:
    """out = base + λ · Σᵢ mᵢ·wᵢ·δ̂ᵢ / D (the module docstring). Weights apply before the election,
    and trimmed zeros never vote. `tensors[0]` is the base."""
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


def as_merge_method(row: TaskVectorMethod) -> MergeMethod:
    sparsify = SPARSIFIERS[row.sparsifier] if row.sparsifier else None
    elect_sign = row.consensus == "sign"

    def merge(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
        return combine_task_vectors(tensors, params, sparsify=sparsify, elect_sign=elect_sign)

    merge.__name__ = f"merge_{row.name}"
    consensus = "s = sign(Σᵢ wᵢ·δ̂ᵢ), mᵢ = [sign(wᵢ·δ̂ᵢ) = s]" if elect_sign else "mᵢ = 1"
    merge.__doc__ = (f"{row.name}: {SPARSIFIER_FORMULAS[row.sparsifier]}"
                     f"{', L1-rescaled' if row.rescale else ''}; {consensus}; "
                     f"out = base + λ · Σᵢ mᵢ·wᵢ·δ̂ᵢ / D. Source: {row.reference}")
    return MergeMethod(
        name=row.name,
        function=merge,
        parameters=task_vector_parameters(normalize=row.normalize, rescale=row.rescale) + row.extra,
        base="required",
        min_models=0,
        reference=row.reference,
        takes_float32_inputs=False,
        uses_seed=row.sparsifier in SEEDED,
    )


METHODS = tuple(as_merge_method(row) for row in FAMILY)
