"""Fixtures: a family of tiny variants (base, a fine-tune, two SLERP merges, a LoRA adapter) and a private store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import build_hf_model, build_tokenizer

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def private_store(tmp_path, monkeypatch):
    """Measurements of unwritable folders go to QWENLAB_HOME: keep them out of the user's cache."""
    monkeypatch.setenv("QWENLAB_HOME", str(tmp_path / "qwenlab-home"))


def slerp_config(root: Path, t) -> dict:
    return {"merge_method": "slerp", "base_model": str(root / "base"),
            "models": [{"model": str(root / "base")}, {"model": str(root / "other")}],
            "parameters": {"t": t}, "dtype": "float32"}


def write_lora(base: Path, out: Path, rank: int = 2, seed: int = 0) -> Path:
    from qwenlab.adapters import LoraAdapter, write_adapter
    from qwenlab.checkpoint import open_checkpoint
    from qwenlab.checkpoint.lineage import make_lineage

    config = open_checkpoint(base).config
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(config.num_hidden_layers):
        kv_width = config.num_key_value_heads * config.head_dim
        for name, out_features in (("q_proj", config.hidden_size), ("v_proj", kv_width)):
            a = torch.randn(rank, config.hidden_size, generator=generator) * 0.3
            b = torch.randn(out_features, rank, generator=generator) * 0.3
            modules[f"model.layers.{layer}.self_attn.{name}"] = (a, b)
    adapter = LoraAdapter(modules=modules, alpha=2 * rank, base_model=str(base))
    return write_adapter(adapter, out, tokenizer_from=base,
                         lineage=make_lineage("adapter", "lora-sft", {"base": base}, {"r": rank, "steps": 3}))


def build_model(folder: Path, seed: int) -> Path:
    """A tiny model whose vocabulary is exactly its tokenizer's (lm_eval's HF model resizes it otherwise)."""
    from qwenlab.model.tokenizer import load_tokenizer

    build_tokenizer(folder)
    build_hf_model(folder, vocab_size=load_tokenizer(folder).vocab_size, seed=seed, with_tokenizer=False)
    return folder


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> Path:
    """base, other (a 'fine-tune' of base), slerp-0.3 and slerp-0.7 of the two, lora (an adapter over base)."""
    from qwenlab.checkpoint.lineage import make_lineage, write_lineage
    from qwenlab.merge import merge

    root = tmp_path_factory.mktemp("family")
    build_model(root / "base", seed=0)
    build_model(root / "other", seed=1)
    write_lineage(root / "other", make_lineage("trained", "sft-full", {"base": root / "base"}, {"steps": 3}))
    for t in (0.3, 0.7):
        merge(slerp_config(root, t), root / f"slerp-{t}", progress=False)
    write_lora(root / "base", root / "lora")
    return root


@pytest.fixture
def fresh_family(family, tmp_path) -> Path:
    """A copy of the family that a test may record measurements into."""
    return Path(shutil.copytree(family, tmp_path / "family"))
