"""Combine LoRA adapters of one base into one adapter, with PEFT's add_weighted_adapter methods.

With ΔWᵢ = sᵢ Bᵢ Aᵢ (sᵢ the scaling) and weights wᵢ:
  cat          exact: A = [w₁s₁A₁; w₂s₂A₂; ...], B = [B₁ B₂ ...], so B A = Σ wᵢ ΔWᵢ; rank Σ rᵢ.
  svd          Σ wᵢ ΔWᵢ, truncated to rank r by SVD (exact when r ≥ the rank of the sum).
  ties         TIES-merging (Yadav et al. 2023) of the deltas: keep the top `density` of each ΔWᵢ by
               magnitude, elect a sign per entry from Σ ΔWᵢ, average the agreeing weighted entries; then SVD.
  dare_linear  DARE (Yu et al. 2023): drop entries of each ΔWᵢ with probability 1 - density, rescale
               by 1/density, weighted sum; then SVD.
  dare_ties    DARE's random drop, then TIES' sign election and disjoint mean; then SVD.
  linear       PEFT's cheap approximation: weighted sums of the A's and of the B's separately
               (needs equal ranks; B A is not Σ wᵢ ΔWᵢ).
The SVD-based methods write alpha = r (scaling 1). Formulas follow peft.utils.merge_utils.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenlab.adapters.extract import low_rank_factors
from qwenlab.adapters.peft_format import LoraAdapter, read_adapter, write_adapter
from qwenlab.errors import QwenlabError

METHODS = ("cat", "svd", "ties", "dare_linear", "dare_ties", "linear")


# ---- pure functions on stacked deltas (as in peft.utils.merge_utils) ----------------------
def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·numel) entries of largest magnitude."""
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.topk(delta.abs().reshape(-1), k=k).indices] = 1
    return delta * mask.reshape(delta.shape)


def random_prune(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescaled by 1/density."""
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * keep / density


def ties_disjoint_merge(deltas: torch.Tensor, weights: torch.Tensor, majority: str = "total") -> torch.Tensor:
    """Elect a sign per entry (from the sum, or the count with `frequency`), average agreeing weighted entries."""
    signs = deltas.sign()
    magnitude = deltas.sum(dim=0) if majority == "total" else signs.sum(dim=0)
    agree = signs == torch.where(magnitude >= 0, 1.0, -1.0)
    weighted = deltas * weights.view(-1, *([1] * (deltas.ndim - 1)))
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


def combine_deltas(deltas: list[torch.Tensor], weights: list[float], method: str, density: float = 1.0,
                   majority: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float32)
    if method in ("ties", "dare_ties", "dare_linear") and density < 1:
        prune = magnitude_prune if method == "ties" else (lambda d, p: random_prune(d, p, generator))
        deltas = [prune(d, density) for d in deltas]
    stacked = torch.stack(deltas)
    if method in ("ties", "dare_ties"):
        return ties_disjoint_merge(stacked, w, majority)
    return (stacked * w.view(-1, 1, 1)).sum(dim=0)  # svd, dare_linear: the weighted sum


# ---- whole adapters ------------------------------------------------------------------------
@dataclass
class CombineReport:
    method: str
    rank: int
    energy: dict[str, float] = field(default_factory=dict)  # SVD methods: module -> energy kept

    def as_dict(self) -> dict:
        out = {"method": self.method, "rank": self.rank}
        if self.energy:
            out["total_energy_min"] = round(min(self.energy.values()), 6)
            out["energy"] = {k: round(v, 6) for k, v in self.energy.items()}
        return out


def _check_compatible(adapters: list[LoraAdapter]) -> list[str]:
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for adapter in adapters:
        for module, (a, b) in adapter.modules.items():
            shape = (b.shape[0], a.shape[1])
            seen = shapes.setdefault(module, (shape, adapter.source))
            if seen[0] != shape:
                raise QwenlabError(f"adapters {seen[1]} and {adapter.source} were made for different bases: module "
                                   f"'{module}' is {list(seen[0])} in one and {list(shape)} in the other")
    return sorted(shapes, key=lambda m: [int(p) if p.isdigit() else p for p in m.split(".")])


def combine_adapters(adapters: list[LoraAdapter], weights: list[float] | None = None, method: str = "cat",
                     rank: int | None = None, density: float = 1.0, majority: str = "total",
                     seed: int = 0) -> tuple[LoraAdapter, CombineReport]:
    if method not in METHODS:
        raise QwenlabError(f"unknown combine method '{method}'; known: {', '.join(METHODS)}")
    if len(adapters) < 2:
        raise QwenlabError("combine needs at least two adapters")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise QwenlabError(f"{len(weights)} weights for {len(adapters)} adapters")
    if not 0 < density <= 1:
        raise QwenlabError(f"density must be in (0, 1], got {density}")
    if majority not in ("total", "frequency"):
        raise QwenlabError(f"majority sign method must be 'total' or 'frequency', got '{majority}'")
    modules = _check_compatible(adapters)
    ranks = {a.source: sorted(a.ranks()) for a in adapters}
    if method == "linear" and len({r for rs in ranks.values() for r in rs}) > 1:
        listed = ", ".join(f"{src}: r={'/'.join(map(str, rs))}" for src, rs in ranks.items())
        raise QwenlabError(f"method 'linear' needs adapters of equal rank, got {listed}; use 'cat' or 'svd'")
    if method == "cat":
        return _cat(adapters, weights, modules), CombineReport(method, sum(max(a.ranks()) for a in adapters))
    if method == "linear":
        return _linear(adapters, weights, modules), CombineReport(method, next(iter(adapters[0].ranks())))
    rank = rank or max(max(a.ranks()) for a in adapters)
    generator = torch.Generator().manual_seed(seed)
    report = CombineReport(method, rank)
    out = {}
    for module in modules:
        present = [(a, w) for a, w in zip(adapters, weights) if module in a.modules]
        delta = combine_deltas([a.delta(module) for a, _ in present], [w for _, w in present], method, density,
                               majority, generator)
        a, b, kept, whole = low_rank_factors(delta, rank)
        out[module] = (a, b)
        report.energy[module] = kept / whole if whole > 0 else 1.0
    return LoraAdapter(out, alpha=float(rank), base_model=adapters[0].base_model, source="combined"), report


def _cat(adapters: list[LoraAdapter], weights: list[float], modules: list[str]) -> LoraAdapter:
    total = sum(max(a.ranks()) for a in adapters)
    out = {}
    for module in modules:
        a_parts, b_parts = [], []
        for adapter, weight in zip(adapters, weights):
            if module in adapter.modules:
                a, b = adapter.modules[module]
                a_parts.append(a.float() * weight * adapter.scaling(module))
                b_parts.append(b.float())
        a, b = torch.cat(a_parts), torch.cat(b_parts, dim=1)
        pad = total - a.shape[0]  # modules missing from some adapters: zero directions keep one rank
        out[module] = (torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], pad)], 1))
    return LoraAdapter(out, alpha=float(total), base_model=adapters[0].base_model, source="combined")


def _linear(adapters: list[LoraAdapter], weights: list[float], modules: list[str]) -> LoraAdapter:
    out = {}
    for module in modules:
        a_sum = b_sum = 0
        for adapter, weight in zip(adapters, weights):
            if module in adapter.modules:
                a, b = adapter.modules[module]
                ws = weight * adapter.scaling(module)
                # the sign goes on one side only, so that B A keeps it
                a_sum = a_sum + a.float() * math.copysign(math.sqrt(abs(ws)), ws)
                b_sum = b_sum + b.float() * math.sqrt(abs(ws))
        out[module] = (a_sum, b_sum)
    rank = next(iter(adapters[0].ranks()))
    return LoraAdapter(out, alpha=float(rank), base_model=adapters[0].base_model, source="combined")


def combine_adapters_to_folder(adapter_dirs: list[str | Path], out: str | Path, *, weights: list[float] | None = None,
                               method: str = "cat", rank: int | None = None, density: float = 1.0,
                               majority: str = "total", seed: int = 0, force: bool = False) -> CombineReport:
    from qwenlab.checkpoint.lineage import make_lineage

    adapters = [read_adapter(d) for d in adapter_dirs]
    combined, report = combine_adapters(adapters, weights, method, rank, density, majority, seed)
    lineage = make_lineage("adapter", f"lora-combine-{method}",
                           {f"adapter{i}": Path(d) for i, d in enumerate(adapter_dirs)},
                           {"weights": weights, "rank": report.rank, "density": density, "seed": seed})
    tokenizer_from = next((Path(d) for d in adapter_dirs if (Path(d) / "tokenizer.json").is_file()), None)
    write_adapter(combined, out, force=force, tokenizer_from=tokenizer_from, lineage=lineage, inputs=adapter_dirs)
    return report
