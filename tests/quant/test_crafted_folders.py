"""Crafted quantized folders: every tensor's shape and dtype, and the quantization section, are checked
against config.json before any kernel sees them. A norm of shape [1] used to make the native RMSNorm
read past its end (a segfault); each case loads in a child process, which must end with one error line
and exit code 2, never a signal."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenlab.checkpoint import open_checkpoint
from qwenlab.errors import QwenlabError
from qwenlab.quant import load_quantized_model

CHILD = Path(__file__).with_name("load_child.py")


def crafted(source: Path, folder: Path, change=None, section=None) -> Path:
    """A copy of a quantized folder with its tensors passed through `change` and its quantization
    section updated with `section`."""
    shutil.copytree(source, folder)
    if change is not None:
        tensors = change(load_file(folder / "model.safetensors"))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if section is not None:
        config = json.loads((folder / "config.json").read_text())
        config["quantization"].update(section)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def load_in_child(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHILD), str(folder)], capture_output=True, text=True, timeout=300)


def replaced(name: str, value: torch.Tensor):
    return lambda tensors: {**tensors, name: value}


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> str:
    assert done.returncode == 2, f"exit {done.returncode} (a negative code is a signal)\n{done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_the_untouched_folder_decodes_in_the_child(quantized_dirs):
    """The control for the cases below: the same child decodes the folders as they were written."""
    for folder in quantized_dirs.values():
        done = load_in_child(folder)
        assert done.returncode == 0 and done.stdout.strip() == "decoded 3", done.stderr


# (bits, tensor, replacement, what the error line must name). tiny32: hidden 64, intermediate 128,
# 2 kv heads of 16 (k/v width 32), group 32.
CASES = [
    pytest.param(8, "model.norm.weight", torch.ones(1), ["'model.norm.weight' has shape [1], expected [64]"],
                 id="final-norm-of-shape-1"),
    pytest.param(4, "model.layers.1.input_layernorm.weight", torch.ones(1),
                 ["'model.layers.1.input_layernorm.weight' has shape [1], expected [64]"], id="layer-norm-of-shape-1"),
    pytest.param(4, "model.layers.0.self_attn.k_proj.bias", torch.zeros(5),
                 ["'model.layers.0.self_attn.k_proj.bias' has shape [5], expected [32]"], id="bias-of-wrong-shape"),
    pytest.param(8, "model.layers.0.mlp.down_proj.scales", torch.ones(64, 2, dtype=torch.float16),
                 ["'model.layers.0.mlp.down_proj.scales' has shape [64, 2], expected [64, 4]"],
                 id="scales-of-wrong-shape"),
    pytest.param(4, "model.layers.1.mlp.gate_proj.zeros", torch.ones(128, 1, dtype=torch.float16),
                 ["'model.layers.1.mlp.gate_proj.zeros' has shape [128, 1], expected [128, 2]"],
                 id="zeros-of-wrong-shape"),
    pytest.param(8, "model.layers.0.mlp.up_proj.qweight", torch.zeros(128, 64, dtype=torch.float32),
                 ["'model.layers.0.mlp.up_proj.qweight' has dtype F32, expected I8"], id="packed-weight-of-wrong-dtype"),
    pytest.param(4, "model.layers.0.mlp.up_proj.qweight", torch.zeros(128, 32, dtype=torch.int16),
                 ["'model.layers.0.mlp.up_proj.qweight' has dtype I16, expected U8"], id="int4-weight-of-wrong-dtype"),
    pytest.param(8, "model.norm.weight", torch.ones(64, dtype=torch.float16),
                 ["'model.norm.weight' has dtype F16, expected F32"], id="norm-of-wrong-dtype"),
    pytest.param(4, "model.embed_tokens.qweight", torch.zeros(299, 64, dtype=torch.int8),
                 ["'model.embed_tokens.qweight' has shape [299, 64], expected [300, 64]"],
                 id="embedding-of-wrong-shape"),
]


@pytest.mark.parametrize("bits,name,value,fragments", CASES)
def test_a_crafted_tensor_is_one_line_error_in_a_child_not_a_signal(quantized_dirs, tmp_path, bits, name, value,
                                                                    fragments):
    folder = crafted(quantized_dirs[bits], tmp_path / "q", replaced(name, value))
    line = assert_one_line_error(load_in_child(folder), *fragments)
    assert "model.safetensors: tensor" in line  # the file that holds it, then the tensor


def test_a_missing_and_an_unexpected_tensor_are_named(quantized_dirs, tmp_path):
    without = crafted(quantized_dirs[4], tmp_path / "missing",
                      lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.down_proj.zeros"})
    assert_one_line_error(load_in_child(without), "missing tensor 'model.layers.1.mlp.down_proj.zeros'")
    extra = crafted(quantized_dirs[8], tmp_path / "extra", replaced("model.layers.0.self_attn.o_proj.bias", torch.zeros(64)))
    assert_one_line_error(load_in_child(extra), "unexpected tensor 'model.layers.0.self_attn.o_proj.bias'")


@pytest.mark.parametrize("section,fragment", [
    ({"bits": 3}, "'bits' must be one of 8, 4, got 3"),
    ({"bits": "8"}, "'bits' must be one of 8, 4, got '8'"),
    ({"head_bits": 2}, "'head_bits' must be one of 16, 8, 4, got 2"),
    ({"group_size": 48}, "'group_size' must be one of 32, 64, 128, got 48"),
    ({"group_size": 0}, "'group_size' must be one of 32, 64, 128, got 0"),
    ({"group_size": 128}, "'group_size' 128 does not divide hidden_size 64"),
    ({"version": 9}, "format version 9 is not supported"),
])
def test_a_crafted_quantization_section_is_one_line_error(quantized_dirs, tmp_path, section, fragment):
    folder = crafted(quantized_dirs[8], tmp_path / "q", section=section)
    with pytest.raises(QwenlabError) as error:
        load_quantized_model(open_checkpoint(folder, validate=False))
    message = str(error.value)
    assert fragment in message and "config.json: quantization" in message and "\n" not in message


def test_group_size_64_on_int8_is_read_with_its_shapes(tiny32_dir, tmp_path):
    """The checks follow the section: a folder written with group 64 has [N, K/64] scales and loads."""
    from qwenlab.quant import quantize_model

    folder = quantize_model(tiny32_dir, tmp_path / "g64", bits=8, group_size=64, progress=False)
    model = load_quantized_model(open_checkpoint(folder, validate=False))
    assert model.model.layers[0].mlp.down_proj.group_size == 64
    scales = crafted(folder, tmp_path / "g64-bad", replaced("model.layers.0.mlp.down_proj.scales",
                                                            torch.ones(64, 4, dtype=torch.float16)))
    with pytest.raises(QwenlabError, match=r"down_proj\.scales' has shape \[64, 4\], expected \[64, 2\]"):
        load_quantized_model(open_checkpoint(scales, validate=False))


def test_the_quantized_loader_refuses_a_shard_outside_the_folder(quantized_dirs, tmp_path):
    """An index naming a valid copy of the weights one folder up: refused by the checkpoint and by the
    quantized loader's own reader (StoredTensors), which reads the index again."""
    from qwenlab.quant.stored import StoredTensors

    folder = crafted(quantized_dirs[8], tmp_path / "q")
    (folder / "model.safetensors").rename(tmp_path / "outside.safetensors")
    names = list(load_file(tmp_path / "outside.safetensors"))
    index = {"metadata": {}, "weight_map": {name: "../outside.safetensors" for name in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    expected = r"model\.safetensors\.index\.json: shard '\.\./outside\.safetensors' is not a file name in the model folder"
    with pytest.raises(QwenlabError, match=expected):
        StoredTensors(folder)
    assert_one_line_error(load_in_child(folder), "shard '../outside.safetensors' is not a file name")
