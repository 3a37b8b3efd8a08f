"""Weights are written with the mode every other file gets (0666 less the umask), not safetensors' 0600."""

import os

import torch


def expected_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_checkpoint_shards_and_adapters_get_the_usual_file_mode(tiny_model_dir, tmp_path):
    from qwenlab.adapters import LoraAdapter, write_adapter
    from qwenlab.checkpoint import open_checkpoint
    from qwenlab.quant import quantize_model

    out = quantize_model("nano", tmp_path / "int8", bits=8, group_size=32, progress=False)
    weights = [p for p in out.iterdir() if p.suffix == ".safetensors"]
    assert weights and all(p.stat().st_mode & 0o777 == expected_mode() for p in weights)
    assert all(p.stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777 for p in weights)

    config = open_checkpoint(tiny_model_dir).config
    module = "model.layers.0.self_attn.q_proj"
    adapter = LoraAdapter(modules={module: (torch.zeros(2, config.hidden_size), torch.zeros(config.hidden_size, 2))},
                          alpha=4.0, base_model=str(tiny_model_dir))
    folder = write_adapter(adapter, tmp_path / "adapter")
    assert (folder / "adapter_model.safetensors").stat().st_mode & 0o777 == expected_mode()
