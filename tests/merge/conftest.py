"""Tiny random Qwen2 models for merge tests, and mergekit run in-process on the same YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import build_hf_model

LAYERS = 4


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Four tied fp32 models (a = the base) with one tokenizer; seeds differ so every tensor differs."""
    root = tmp_path_factory.mktemp("merge-models")
    folders = {}
    for index, name in enumerate("abcd"):
        folders[name] = root / name
        build_hf_model(folders[name], layers=LAYERS, seed=10 + index, with_tokenizer=(name == "a"))
        if name != "a":  # the same tokenizer everywhere, without re-training it
            for file in ("tokenizer.json", "tokenizer_config.json"):
                (folders[name] / file).write_bytes((folders["a"] / file).read_bytes())
    return folders


@pytest.fixture(scope="session")
def untied_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-untied")
    return {name: (build_hf_model(root / name, layers=2, seed=20 + i, tied=False, with_tokenizer=False), root / name)[1]
            for i, name in enumerate("ab")}


def run_mergekit(config: dict, out: Path, config_may_fail: bool = False) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5 through its Python API (no model card: it would look paths up on the Hub).

    config_may_fail: mergekit 0.1.5 with transformers 5 writes every tensor, then fails to save
    config.json when the layer count changes (layer_types keeps the old length); the tensors stand.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    try:
        run_merge(MergeConfiguration.model_validate(config), str(out), options)
    except Exception as e:
        if not (config_may_fail and "layer_types" in str(e)):
            raise
    return read_tensors(out)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], atol: float = 1e-5):
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert ours[name].shape == theirs[name].shape, name
        difference = (ours[name].double() - theirs[name].double()).abs().max().item()
        assert difference <= atol, f"{name}: max |difference| {difference}"
