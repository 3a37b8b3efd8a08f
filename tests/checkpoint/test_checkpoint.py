"""Checkpoint folders: lazy reads, shards with index, tied heads, atomic writes, and every bad input."""

import json
import shutil

import pytest
import torch

from qwenlab.checkpoint import CheckpointWriter, expected_tensor_shapes, open_checkpoint, parse_size
from qwenlab.checkpoint.random_model import write_random_model
from qwenlab.cli import main
from qwenlab.errors import QwenlabError
from qwenlab.model import Qwen2Config, load_model
from tests.conftest import build_hf_model


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(folder, change):
    """Rewrite model.safetensors with `change(dict) -> dict` applied."""
    from safetensors.torch import load_file, save_file

    tensors = change(load_file(folder / "model.safetensors"))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_reads_config_and_tensors_lazily(tiny_model_dir):
    ckpt = open_checkpoint(tiny_model_dir)
    assert ckpt.config.num_hidden_layers == 3 and ckpt.config.tie_word_embeddings
    assert "lm_head.weight" not in ckpt  # tied: the head reads embed_tokens
    assert ckpt.lm_head_name() == "model.embed_tokens.weight"
    assert ckpt.shape("model.layers.0.self_attn.k_proj.weight") == (16, 48)
    assert ckpt.get("model.norm.weight").shape == (48,)


def test_sharded_round_trip_equals_single_file(tiny_model_dir, tmp_path):
    ckpt = open_checkpoint(tiny_model_dir)
    out = tmp_path / "sharded"
    with CheckpointWriter(out, ckpt.config.to_hf_dict(), max_shard_bytes=20_000) as writer:
        for name in ckpt.tensor_names():
            writer.add(name, ckpt.get(name))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    again = open_checkpoint(out)
    for name in ckpt.tensor_names():
        assert torch.equal(again.get(name), ckpt.get(name))
    tokens = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(load_model(out)(tokens), load_model(tiny_model_dir)(tokens))


def test_transformers_reads_our_sharded_output(tmp_path):
    from transformers import AutoModelForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    out = write_random_model(config, tmp_path / "rand", seed=1, dtype=torch.float32, max_shard_bytes=10_000,
                             progress=False)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert (hf(tokens).logits - load_model(out)(tokens)).abs().max() <= 1e-4


def test_random_model_is_deterministic_per_seed(tmp_path):
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    a = open_checkpoint(write_random_model(config, tmp_path / "a", seed=3, progress=False))
    b = open_checkpoint(write_random_model(config, tmp_path / "b", seed=3, progress=False))
    c = open_checkpoint(write_random_model(config, tmp_path / "c", seed=4, progress=False))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.get(name), b.get(name)) and not torch.equal(a.get(name), c.get(name))
    assert set(a.tensor_names()) == set(expected_tensor_shapes(config))


def test_writer_is_atomic_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, {"model_type": "qwen2"}) as writer:
            writer.add("a", torch.zeros(3))
            raise RuntimeError("interrupted")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_writer_refuses_existing_output_unless_forced(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(QwenlabError, match="exists"):
        CheckpointWriter(tmp_path / "out", {})
    with CheckpointWriter(tmp_path / "out", {"x": 1}, force=True) as writer:
        writer.add("a", torch.ones(2))
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000 and parse_size("1MiB") == 1024**2 and parse_size(77) == 77
    with pytest.raises(QwenlabError):
        parse_size("lots")


def test_reads_transformers5_and_qwen_config_styles(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    data = json.loads((folder / "config.json").read_text())
    data.pop("rope_theta", None)
    data["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    (folder / "config.json").write_text(json.dumps(data))
    assert open_checkpoint(folder).config.rope_theta == 12345.0
    data.pop("rope_parameters")
    data["rope_theta"] = 777.0
    (folder / "config.json").write_text(json.dumps(data))
    assert open_checkpoint(folder).config.rope_theta == 777.0


# ---- bad input: one clear line each ------------------------------------------------------------

def bad(folder, pattern):
    with pytest.raises(QwenlabError, match=pattern):
        open_checkpoint(folder)


def test_missing_config(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    (folder / "config.json").unlink()
    bad(folder, "missing config.json")


def test_invalid_config_json(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    bad(folder, "invalid JSON")


def test_config_missing_field(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    data = json.loads((folder / "config.json").read_text())
    del data["hidden_size"]
    (folder / "config.json").write_text(json.dumps(data))
    bad(folder, "missing field.*hidden_size")


def test_unsupported_architecture(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    data = json.loads((folder / "config.json").read_text())
    data.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (folder / "config.json").write_text(json.dumps(data))
    bad(folder, "unsupported architecture.*LlamaForCausalLM")


def test_missing_tensor_is_named(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    rewrite_tensors(folder, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    bad(folder, r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight")


def test_unexpected_tensor_is_named(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    rewrite_tensors(folder, lambda t: {**t, "model.layers.9.extra.weight": torch.zeros(2)})
    bad(folder, r"unexpected tensor\(s\) model\.layers\.9\.extra\.weight")


def test_misshaped_tensor_is_named_with_both_shapes(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    rewrite_tensors(folder, lambda t: {**t, "model.norm.weight": torch.zeros(47)})
    bad(folder, r"'model\.norm\.weight' has shape \[47\], expected \[48\]")


def test_untied_config_without_lm_head(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    data = json.loads((folder / "config.json").read_text())
    data["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(data))
    bad(folder, r"missing tensor\(s\) lm_head\.weight")


def test_truncated_safetensors(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    bad(folder, "truncated")


def test_corrupt_safetensors_header(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage garbage}")
    bad(folder, "corrupt safetensors header")


def test_pickle_checkpoint_is_refused(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    bad(folder, "pickle checkpoint pytorch_model.bin.*safetensors only")


def test_index_naming_a_missing_shard(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    bad(folder, "shard file.*missing.*model-00001-of-00002")


def test_cli_prints_one_line_and_exits_nonzero(tiny_model_dir, tmp_path, capsys):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x01\x02")
    assert main(["info", str(folder)]) == 2  # a user error: exit code 2, as argparse gives a bad command line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
