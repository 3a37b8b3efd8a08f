"""Bad input fails with one clear line, before anything is written, and leaves nothing behind."""

import json
import shutil

import pytest

from qwenlab.errors import QwenlabError
from qwenlab.merge import merge
from tests.conftest import build_hf_model


def slerp_config(models, **parameters):
    return {"merge_method": "slerp", "base_model": str(models["a"]), "dtype": "float32",
            "models": [{"model": str(models["a"])}, {"model": str(models["b"])}],
            "parameters": parameters or {"t": 0.5}}


def fails(config, out, match, **options):
    with pytest.raises(QwenlabError, match=match) as error:
        merge(config, out, progress=False, **options)
    message = str(error.value)
    assert "\n" not in message
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    return message


def test_unknown_method_and_parameter(models, tmp_path):
    config = slerp_config(models)
    fails({**config, "merge_method": "frankenstein"}, tmp_path / "o", "merge_method: unknown method 'frankenstein'")
    config["models"][1]["parameters"] = {"densty": 0.5}
    fails(config, tmp_path / "o", r"models\[1\]\.parameters\.densty: unknown parameter for slerp")


def test_missing_model_path(models, tmp_path):
    config = slerp_config(models)
    config["models"][1]["model"] = str(tmp_path / "nowhere")
    fails(config, tmp_path / "o", "nowhere: no such model folder")


@pytest.mark.parametrize("parameters, match", [
    ({"t": 1.5}, r"parameters\.t: t = 1\.5 is outside \[0\.0, 1\.0\]"),
    ({"t": [0, 0.5, -0.1]}, r"parameters\.t\[2\]: t = -0\.1 is outside"),
    ({"t": [{"filter": "mlp", "value": 2}]}, r"parameters\.t\[0\]\.value: t = 2"),
    ({"t": "half"}, r"parameters\.t: expected a number, got 'half'"),
])
def test_t_outside_zero_one(models, tmp_path, parameters, match):
    fails(slerp_config(models, **parameters), tmp_path / "o", match)


@pytest.mark.parametrize("density", [0, 1.5, -0.2])
def test_density_outside_zero_one(models, tmp_path, density):
    config = {"merge_method": "ties", "base_model": str(models["a"]),
              "models": [{"model": str(models["b"]), "parameters": {"weight": 1, "density": density}}]}
    fails(config, tmp_path / "o", rf"models\[0\]\.parameters\.density: density = {density} is outside \(0\.0, 1\.0\]")


def test_unknown_dtype(models, tmp_path):
    fails({**slerp_config(models), "dtype": "float8"}, tmp_path / "o", "dtype: unknown dtype 'float8'")
    fails(slerp_config(models), tmp_path / "o", "--dtype: unknown dtype 'int4'", dtype="int4")


def test_layer_range_out_of_bounds(models, tmp_path):
    config = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": str(models["a"]), "layer_range": [2, 9]}]}]}
    fails(config, tmp_path / "o", r"slices\[0\]\.sources\[0\]\.layer_range: \[2, 9\] is out of bounds .*\(4 layers")


def test_schema_errors_name_the_yaml_path(models, tmp_path):
    config = slerp_config(models)
    config["models"][0]["paramters"] = {}
    fails(config, tmp_path / "o", r"models\[0\]\.paramters: unknown key")
    fails({"merge_method": "linear"}, tmp_path / "o", "exactly one of 'models' or 'slices'")
    config = slerp_config(models, t={"oops": 1})
    fails(config, tmp_path / "o", r"parameters\.t")
    path = tmp_path / "bad.yaml"
    path.write_text("merge_method: [unclosed\n")
    fails(path, tmp_path / "o", "bad.yaml: invalid YAML")


def test_method_input_rules(models, tmp_path):
    config = slerp_config(models)
    config["models"].append({"model": str(models["c"])})
    fails(config, tmp_path / "o", "slerp takes exactly 1 model\\(s\\) other than the base, got 2")
    config = {"merge_method": "ties", "models": [{"model": str(models["b"]), "parameters": {"weight": 1}}]}
    fails(config, tmp_path / "o", "ties needs a base_model")
    config = {"merge_method": "linear", "models": [{"model": str(models["b"])}, {"model": str(models["c"])}]}
    fails(config, tmp_path / "o", r"parameters\.weight: required but not set")


def test_mismatched_shapes_name_the_tensor_and_both_shapes(models, tmp_path):
    other = tmp_path / "wide"
    build_hf_model(other, layers=4, intermediate=96, with_tokenizer=False)
    config = {"merge_method": "linear", "models": [{"model": str(models["a"]), "parameters": {"weight": 1}},
                                                   {"model": str(other), "parameters": {"weight": 1}}]}
    message = fails(config, tmp_path / "o", r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight': shape mismatch")
    assert "[80, 48] in" in message and "vs [96, 48] in" in message


def test_different_vocabularies_and_mixed_tied_embeddings(models, untied_models, tmp_path):
    bigger = tmp_path / "vocab"
    build_hf_model(bigger, layers=4, vocab_size=336, with_tokenizer=False)
    config = {"merge_method": "linear", "models": [{"model": str(models["a"]), "parameters": {"weight": 1}},
                                                   {"model": str(bigger), "parameters": {"weight": 1}}]}
    fails(config, tmp_path / "o", "different vocabularies .*320, 48.* .*336, 48")
    retokenized = tmp_path / "retokenized"
    shutil.copytree(models["b"], retokenized)
    data = json.loads((retokenized / "tokenizer.json").read_text())
    data["model"]["vocab"] = {f"x{token}": i for token, i in data["model"]["vocab"].items()}
    (retokenized / "tokenizer.json").write_text(json.dumps(data))
    config["models"][1]["model"] = str(retokenized)
    fails(config, tmp_path / "o", "different tokenizer vocabularies")
    config["models"][1]["model"] = str(untied_models["a"])
    fails(config, tmp_path / "o", "mix tied and untied embeddings")


def test_existing_output_needs_force(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QwenlabError, match="output folder exists"):
        merge(slerp_config(models), out, progress=False)
    assert (out / "keep.txt").exists()
    merge(slerp_config(models), out, progress=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_an_exception_mid_merge_leaves_no_output(models, tmp_path, monkeypatch):
    from qwenlab.merge import executor

    calls = {"count": 0}
    real = executor.merge_tensor

    def failing(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 10:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(executor, "merge_tensor", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge(slerp_config(models), out, progress=False, max_shard_bytes=1000)  # shards already flushed
    assert calls["count"] == 10
    assert not out.exists() and list(tmp_path.iterdir()) == []
