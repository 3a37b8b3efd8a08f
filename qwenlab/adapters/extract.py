"""Extract a LoRA adapter from a fine-tuned model: truncated SVD of each linear's delta.

    ΔW = W_finetuned - W_base = U S Vᵀ   ->   B = U_r √S_r,  A = √S_r V_rᵀ   (alpha = r, scaling 1)

By Eckart-Young this is the best rank-r approximation of ΔW in Frobenius norm; the energy
captured is Σ_{i≤r} s_i² / Σ s_i². A delta of rank ≤ r is reproduced exactly (to float error).
Tensors that are not linear weights (embeddings, norms, biases) cannot be carried by a LoRA: if
they differ, the report lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenlab.adapters.peft_format import LoraAdapter, write_adapter
from qwenlab.checkpoint import LINEAR_MODULES, open_checkpoint
from qwenlab.errors import QwenlabError


@dataclass
class ExtractReport:
    rank: int
    energy: dict[str, float] = field(default_factory=dict)  # module -> fraction of ||ΔW||² captured
    total_energy: float = 1.0  # over all modules
    unchanged: list[str] = field(default_factory=list)  # linear modules with ΔW = 0
    not_captured: list[str] = field(default_factory=list)  # differing tensors a LoRA cannot carry

    def as_dict(self) -> dict:
        return {"rank": self.rank, "total_energy": round(self.total_energy, 6),
                "min_module_energy": round(min(self.energy.values(), default=1.0), 6),
                "modules": len(self.energy), "unchanged": len(self.unchanged), "not_captured": self.not_captured,
                "energy": {k: round(v, 6) for k, v in self.energy.items()}}


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A [r, in], B [out, r], captured ||·||², total ||·||²) of the best rank-r approximation of delta."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    b = u[:, :r] * root
    a = root[:, None] * vh[:r]
    if r < rank:  # a matrix smaller than the rank: pad with zero directions to keep one rank
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
    energy = s.pow(2)
    return a, b, float(energy[:r].sum()), float(energy.sum())


def extract_adapter(base, finetuned, rank: int, targets: tuple[str, ...] = LINEAR_MODULES,
                    progress: bool = True) -> tuple[LoraAdapter, ExtractReport]:
    """The rank-r LoRA of finetuned - base over the linears named in `targets`, and the energy report."""
    from tqdm import tqdm

    if not isinstance(rank, int) or rank < 1:
        raise QwenlabError(f"--rank must be a positive integer, got {rank!r}")
    base_ckpt, tuned_ckpt = open_checkpoint(base), open_checkpoint(finetuned)
    report = ExtractReport(rank)
    modules = {}
    captured = total = 0.0
    for name in tqdm(base_ckpt.tensor_names(), desc="extract", unit="tensor", disable=not progress):
        if name not in tuned_ckpt:
            raise QwenlabError(f"{tuned_ckpt.path}: tensor '{name}' of the base is missing")
        if base_ckpt.shape(name) != tuned_ckpt.shape(name):
            raise QwenlabError(f"{tuned_ckpt.path} is not a fine-tune of {base_ckpt.path}: '{name}' is "
                               f"{list(tuned_ckpt.shape(name))} there and {list(base_ckpt.shape(name))} in the base")
        delta = tuned_ckpt.get(name).float() - base_ckpt.get(name).float()
        module, _, leaf = name.rpartition(".")
        is_target = leaf == "weight" and module.rsplit(".", 1)[-1] in targets and delta.ndim == 2
        if not is_target:
            if delta.abs().max() > 0:
                report.not_captured.append(name)
            continue
        if delta.abs().max() == 0:
            report.unchanged.append(module)
            continue
        a, b, kept, whole = low_rank_factors(delta, rank)
        modules[module] = (a, b)
        report.energy[module] = kept / whole
        captured, total = captured + kept, total + whole
    if not modules:
        raise QwenlabError(f"{tuned_ckpt.path} does not differ from {base_ckpt.path} in any targeted linear "
                           f"({', '.join(targets)}): nothing to extract")
    report.total_energy = captured / total
    adapter = LoraAdapter(modules=modules, alpha=float(rank), base_model=str(base_ckpt.path), source=str(finetuned))
    return adapter, report


def extract_adapter_to_folder(base, finetuned, out: str | Path, rank: int, targets: tuple[str, ...] = LINEAR_MODULES,
                              force: bool = False, progress: bool = True) -> ExtractReport:
    from qwenlab.checkpoint.lineage import make_lineage

    adapter, report = extract_adapter(base, finetuned, rank, targets, progress)
    base_path = open_checkpoint(base, validate=False).path
    tuned_path = open_checkpoint(finetuned, validate=False).path
    lineage = make_lineage("adapter", "lora-extract", {"base": base_path, "finetuned": tuned_path},
                           {"rank": rank, "total_energy": report.total_energy, "not_captured": report.not_captured})
    write_adapter(adapter, out, force=force, tokenizer_from=base_path, lineage=lineage, inputs=[base_path, tuned_path])
    return report
