"""Sparsification of task vectors (δ = model − base), as the TIES, DARE, breadcrumbs and DELLA
methods use it. Each `keep_*_` function masks δ in place (the trailing underscore, as in torch)
and returns it, optionally rescaled so that its L1 norm is δ's again (mergekit's `rescale`; the
DARE paper divides by the keep probability instead).
"""

from __future__ import annotations

import numpy
import torch

from qwenlab.errors import QwenlabError
from qwenlab.merge.methods.elementwise import chunks, one_thread

RESCALE_EPS = 1e-7


def rescale_to_l1(l1_before: float, masked: torch.Tensor) -> torch.Tensor:
    """masked · ‖δ‖₁ / ‖masked‖₁ (in place), unless either norm is below 1e-7 (then masked as is)."""
    l1_after = float(torch.linalg.vector_norm(masked, ord=1))
    if l1_before < RESCALE_EPS or l1_after < RESCALE_EPS:
        return masked
    return masked.mul_(l1_before / l1_after)


def _apply(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """δ ⊙ mask, in place (δ is the caller's own task vector), L1-rescaled if asked."""
    l1_before = float(torch.linalg.vector_norm(delta, ord=1)) if rescale else 0.0
    masked = delta.mul_(mask)
    return rescale_to_l1(l1_before, masked) if rescale else masked


def _magnitude_thresholds(flat: torch.Tensor, start: int, stop: int) -> tuple[float, float]:
    """The |values| ranked start and stop − 1 (ascending), by a linear-time partition, not a sort."""
    scratch = numpy.abs(flat.numpy())
    scratch.partition(sorted({start, stop - 1}))
    return float(scratch[start]), float(scratch[stop - 1])


def rank_band_mask(values: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """A bool mask of the entries whose rank by |value|, ascending, lies in [start, stop).

    Equal magnitudes are ranked by position, so exactly stop − start entries are kept.
    """
    flat = values.reshape(-1)
    count = flat.numel()
    start, stop = max(0, start), min(count, stop)
    if stop <= start or (start == 0 and stop == count):
        return torch.full(values.shape, stop > start, dtype=torch.bool)
    low, high = _magnitude_thresholds(flat, start, stop)
    mask = torch.empty(count, dtype=torch.bool)
    kept = 0
    with one_thread():
        for part in chunks(count):
            magnitude = flat[part].abs()
            if stop == count:  # top-k (TIES): no upper bound to test
                torch.ge(magnitude, low, out=mask[part])
            else:
                torch.logical_and(magnitude >= low, magnitude <= high, out=mask[part])
            kept += int(torch.count_nonzero(mask[part]))
    if kept != stop - start:  # equal magnitudes at a boundary: keep the first ones by position
        boundaries = {low} if start > 0 else set()
        boundaries |= {high} if stop < count else set()
        for boundary in sorted(boundaries):
            _rank_boundary_entries(flat, mask, boundary, start, stop)
    return mask.reshape(values.shape)


def _rank_boundary_entries(flat: torch.Tensor, mask: torch.Tensor, boundary: float, start: int, stop: int) -> None:
    """Among entries with |value| == boundary, keep those whose position-ordered rank is in range."""
    magnitude = flat.abs()
    below = int(torch.count_nonzero(magnitude < boundary))
    positions = (magnitude == boundary).nonzero().squeeze(1)
    del magnitude
    ranks = torch.arange(below, below + positions.numel())
    mask[positions] = (ranks >= start) & (ranks < stop)


def keep_largest_(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """TIES trim: keep the k = max(1, ⌊density·n⌋) entries of largest |δ|, zero the rest."""
    if density >= 1:
        return delta
    count = delta.numel()
    keep = max(1, int(density * count))
    return _apply(delta, rank_band_mask(delta, count - keep, count), rescale)


def keep_middle_(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Breadcrumbs: drop the ⌊gamma·n⌋ largest |δ| (outliers) and the smallest, keeping ⌊density·n⌋.

    Outlier removal shrinks when density + gamma > 1, so that ⌊density·n⌋ entries remain.
    """
    if density >= 1:
        return delta
    count = delta.numel()
    keep = int(density * count)
    bottom = max(0, count - keep - int(gamma * count))
    return _apply(delta, rank_band_mask(delta, bottom, bottom + keep), rescale)


def keep_random_(delta: torch.Tensor, density: float, seed: int, rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability density (a Bernoulli mask from `seed`)."""
    if density >= 1:
        return delta
    generator = torch.Generator().manual_seed(seed)
    return _apply(delta, torch.rand(delta.shape, generator=generator) < density, rescale)


def keep_random_by_rank_(delta: torch.Tensor, density: float, epsilon: float, seed: int,
                        rescale: bool = True) -> torch.Tensor:
    """DELLA MagPrune: keep probability rises linearly with |δ|'s rank within its row, from
    density − epsilon (smallest) to density + epsilon (largest)."""
    if density >= 1:
        return delta
    if not (0 < density - epsilon and density + epsilon < 1):
        raise QwenlabError(f"della: density ± epsilon must lie in (0, 1) (density {density}, epsilon {epsilon})")
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
    span = (ranks.max(dim=1, keepdim=True).values - ranks.min(dim=1, keepdim=True).values)
    rank_fraction = ((ranks - ranks.min(dim=1, keepdim=True).values) / span).clamp(0, 1)
    probabilities = (density - epsilon) + rank_fraction * 2 * epsilon
    generator = torch.Generator().manual_seed(seed)
    mask = torch.bernoulli(probabilities, generator=generator).reshape(delta.shape)
    return _apply(delta, mask, rescale)
