"""The output folder: sharded weights, config, tokenizer per tokenizer_source, lineage, and the CLI."""

import json
import subprocess
import sys

import pytest
import torch

from qwenlab.checkpoint import open_checkpoint
from qwenlab.cli import main
from qwenlab.errors import QwenlabError
from qwenlab.merge import merge
from tests.merge.conftest import read_tensors


def linear_config(models, **extra):
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(models[n]), "parameters": {"weight": 1.0}} for n in "ab"], **extra}


def test_output_folder_is_a_complete_checkpoint(models, tmp_path):
    out = merge(linear_config(models, out_dtype="bfloat16"), tmp_path / "out", progress=False,
                max_shard_bytes=20_000)
    checkpoint = open_checkpoint(out)  # validates the tensor set against config.json
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert checkpoint.config.torch_dtype == "bfloat16" and checkpoint.config.tie_word_embeddings
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).dtype == torch.bfloat16
    assert "lm_head.weight" not in checkpoint.tensor_names()
    assert (out / "tokenizer.json").read_bytes() == (models["a"] / "tokenizer.json").read_bytes()
    assert checkpoint.generation_config["eos_token_id"] == 2
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["kind"] == "merge" and lineage["method"] == "linear" and len(lineage["inputs"]) == 2
    assert lineage["config"]["merge_method"] == "linear"


def test_tokenizer_source_must_have_a_tokenizer(models, tmp_path):
    with pytest.raises(QwenlabError, match="tokenizer_source: .* is not base, union, or a folder"):
        merge(linear_config(models, tokenizer_source=str(tmp_path)), tmp_path / "out", progress=False)
    out = merge(linear_config(models, tokenizer_source=str(models["a"])), tmp_path / "out", progress=False)
    assert (out / "tokenizer.json").is_file()


def test_dtype_override_and_chat_template(models, tmp_path):
    out = merge(linear_config(models, tokenizer_source="base", chat_template="chatml"), tmp_path / "out",
                progress=False, dtype="float16")
    assert all(t.dtype == torch.float16 for t in read_tensors(out).values())
    assert (out / "chat_template.jinja").read_text().startswith("{% for message in messages %}")
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


def test_base_plus_adapter_style_virtual_inputs(models, tmp_path):
    """Any object with the Checkpoint interface can be an input: here, a model scaled in memory."""
    from qwenlab.merge.sources import open_model_source

    class Doubled:
        def __init__(self, inner):
            self.inner, self.path, self.config = inner, inner.path, inner.config
            self.generation_config = inner.generation_config

        def tensor_names(self):
            return self.inner.tensor_names()

        def shape(self, name):
            return self.inner.shape(name)

        def get(self, name):
            return self.inner.get(name) * 2

    config = {"merge_method": "passthrough", "models": [{"model": str(models["a"])}]}
    out = merge(config, tmp_path / "out", progress=False, open_model=lambda p: Doubled(open_model_source(p)))
    a = read_tensors(models["a"])
    assert torch.equal(read_tensors(out)["model.norm.weight"], 2 * a["model.norm.weight"])


def test_cli_dry_run_prints_the_per_layer_table(models, tmp_path, capsys):
    config = tmp_path / "merge.yaml"
    config.write_text(json.dumps({"merge_method": "slerp", "base_model": str(models["a"]),
                                  "models": [{"model": str(models["a"])}, {"model": str(models["b"])}],
                                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]}}))
    assert main(["merge", str(config), str(tmp_path / "out"), "--dry-run"]) == 0
    table = capsys.readouterr().out
    assert "self_attn  0.3333" in table and "mlp        0.5" in table and "output: 4 layers" in table
    assert not (tmp_path / "out").exists()


def test_cli_merge_and_one_line_errors(models, tmp_path, capsys):
    config = tmp_path / "merge.yaml"
    config.write_text(json.dumps(linear_config(models)))
    args = ["merge", str(config), str(tmp_path / "out"), "--max-shard-size", "50KB"]
    result = subprocess.run([sys.executable, "-m", "qwenlab", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert main(args) == 2
    assert "output folder exists" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "missing.yaml"), str(tmp_path / "x")]) == 2
    assert "missing.yaml: no such merge config file" in capsys.readouterr().err
