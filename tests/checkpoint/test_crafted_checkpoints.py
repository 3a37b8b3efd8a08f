"""Crafted float checkpoints and config.json files: one-line errors naming the file and the field or
tensor, before anything is built or allocated from them."""

import json
import math
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenlab.checkpoint import open_checkpoint
from qwenlab.errors import QwenlabError
from qwenlab.model import Qwen2Config, load_model
from qwenlab.checkpoint.config import MAX_PARAMETERS, MAX_SIZES


def copy_with_config(source, folder, **changes):
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def one_line_error(folder, *fragments: str) -> str:
    with pytest.raises(QwenlabError) as error:
        open_checkpoint(folder)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---- config.json: absurd sizes ------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,fragment", [
    ("num_hidden_layers", 10**9, "field 'num_hidden_layers' is 1000000000, over qwenlab's limit of 1024"),
    ("vocab_size", 10**12, "field 'vocab_size' is 1000000000000, over qwenlab's limit of 4194304"),
    ("hidden_size", 2**20 * 6, "field 'hidden_size' is 6291456, over qwenlab's limit of 65536"),
    ("intermediate_size", 10**7, "field 'intermediate_size' is 10000000, over qwenlab's limit of 262144"),
    ("max_position_embeddings", 2**40, "field 'max_position_embeddings' is 1099511627776, over"),
    ("num_attention_heads", 4096, "field 'num_attention_heads' is 4096, over qwenlab's limit of 1024"),
    ("num_hidden_layers", 0, "field 'num_hidden_layers' must be a positive integer, got 0"),
    ("hidden_size", -48, "field 'hidden_size' must be a positive integer, got -48"),
    ("vocab_size", 320.5, "field 'vocab_size' must be a positive integer, got 320.5"),
    ("num_key_value_heads", True, "field 'num_key_value_heads' must be a positive integer, got True"),
    ("intermediate_size", "80", "field 'intermediate_size' must be a positive integer, got '80'"),
    ("num_attention_heads", 5, "hidden_size 48 is not divisible by num_attention_heads 5"),
    ("num_key_value_heads", 4, "num_attention_heads 6 is not divisible by num_key_value_heads 4"),
    ("num_attention_heads", 16, "hidden_size / num_attention_heads = 3 must be even"),
    ("rms_norm_eps", 0, "field 'rms_norm_eps' must be a positive number, got 0"),
    ("rope_theta", "fast", "field 'rope_theta' must be a positive number, got 'fast'"),
    ("tie_word_embeddings", "yes", "field 'tie_word_embeddings' must be true or false, got 'yes'"),
])
def test_an_absurd_config_is_one_line_error_naming_the_field(tiny_model_dir, tmp_path, field, value, fragment):
    changes = {field: value}
    if field == "num_attention_heads" and value == 16:
        changes["num_key_value_heads"] = 16  # divisibility holds: only the odd head width is wrong
    folder = copy_with_config(tiny_model_dir, tmp_path / "m", **changes)
    started = time.perf_counter()
    message = one_line_error(folder, fragment)
    assert message.startswith(str(folder / "config.json") + ": ")
    assert time.perf_counter() - started < 5  # refused before anything is built from the sizes


def test_non_finite_numbers_in_config_are_refused(tiny_model_dir, tmp_path):
    for field in ("rope_theta", "rms_norm_eps"):
        for value in (math.inf, math.nan, -1.0):
            folder = copy_with_config(tiny_model_dir, tmp_path / f"{field}{value}", **{field: value})
            one_line_error(folder, f"field '{field}' must be a positive number")


def test_sizes_each_within_limits_but_huge_together_are_refused(tiny_model_dir, tmp_path):
    """1024 layers x hidden 65536 x intermediate 262144 is ~6e13 parameters: every field is under its own cap."""
    sizes = dict(num_hidden_layers=1024, hidden_size=65536, intermediate_size=262144, num_attention_heads=512,
                 num_key_value_heads=8)
    assert all(value <= MAX_SIZES[field] for field, value in sizes.items())
    folder = copy_with_config(tiny_model_dir, tmp_path / "m", **sizes)
    one_line_error(folder, "config.json: the sizes imply", f"over qwenlab's limit of {MAX_PARAMETERS:.3g}")


def test_the_real_qwen_shapes_are_within_the_limits():
    from qwenlab.checkpoint.config import PRESETS

    for preset in PRESETS.values():
        assert preset.validate() is preset
    qwen72b = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                   num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072)
    assert Qwen2Config(**qwen72b).validate().parameter_count() > 7e10


def test_a_crafted_rope_section_is_one_line_error(tiny_model_dir, tmp_path):
    folder = copy_with_config(tiny_model_dir, tmp_path / "m", rope_parameters="yarn")
    one_line_error(folder, "field 'rope_parameters' must be an object")


# ---- --max-context against the config -------------------------------------------------------------------
def test_the_context_window_is_the_config_or_less(tiny_model_dir):
    config = open_checkpoint(tiny_model_dir).config
    assert config.max_position_embeddings == 256
    assert config.context_window() == 256 and config.context_window(100) == 100 and config.context_window(256) == 256
    with pytest.raises(QwenlabError, match=r"--max-context 257 is beyond the model's context of 256 tokens "
                                           r"\(max_position_embeddings in config.json\)"):
        config.context_window(257)
    for bad in (0, -5, 3.5, True):
        with pytest.raises(QwenlabError, match="--max-context must be a positive number of tokens"):
            config.context_window(bad)
    with pytest.raises(QwenlabError, match="^max_context 10000 is beyond"):
        config.context_window(10_000, flag="max_context")


# ---- tensors: dtype and shape, also when the checkpoint was opened without validation ------------------
def rewrite(source, folder, name, value):
    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_an_integer_tensor_in_a_float_checkpoint_is_refused(tiny_model_dir, tmp_path):
    folder = rewrite(tiny_model_dir, tmp_path / "m", "model.layers.0.mlp.up_proj.weight",
                     torch.zeros(80, 48, dtype=torch.int8))
    one_line_error(folder, "model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' has dtype I8, "
                           "expected a float dtype (F32, BF16, F16)")


def test_load_model_validates_a_checkpoint_opened_without_validation(tiny_model_dir, tmp_path):
    folder = rewrite(tiny_model_dir, tmp_path / "m", "model.norm.weight", torch.ones(1))
    checkpoint = open_checkpoint(folder, validate=False)
    with pytest.raises(QwenlabError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has shape \[1\], "
                                           r"expected \[48\] from config\.json"):
        load_model(checkpoint)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [-1], "data_offsets": [8, 4]},
    {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]},
    {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": "22", "data_offsets": [0, 16]},
    {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]},
])
def test_a_header_entry_with_negative_or_odd_sizes_is_corrupt(tmp_path, entry):
    from qwenlab.checkpoint.safetensors_file import read_header

    header = json.dumps({"t": entry}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(QwenlabError, match=r"x\.safetensors: corrupt safetensors header entry for tensor 't'"):
        read_header(path)
