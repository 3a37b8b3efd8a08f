"""The same YAML through mergekit 0.1.5 and qwenlab gives the same tensors (fp32, within 1e-5)."""

import json

import pytest
import torch

from qwenlab.merge import merge
from tests.merge.conftest import assert_same_tensors, read_tensors, run_mergekit


def both(config: dict, tmp_path, config_may_fail=False, **options):
    theirs = run_mergekit(config, tmp_path / "mergekit", config_may_fail)
    merge(config, tmp_path / "qwenlab", progress=False, **options)
    return read_tensors(tmp_path / "qwenlab"), theirs


def test_slerp_v_gradient_with_self_attn_and_mlp_filters(models, tmp_path):
    config = {"merge_method": "slerp", "base_model": str(models["a"]), "dtype": "float32",
              "models": [{"model": str(models["a"])}, {"model": str(models["b"])}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1, 0.5, 0]},
                                   {"filter": "mlp", "value": [1, 0.5, 0, 0.5, 1]},
                                   {"value": 0.4}]}}
    ours, theirs = both(config, tmp_path)
    assert_same_tensors(ours, theirs)
    # the V really shapes the merge: layer 0 attention is the base, layer 0 mlp is the other model
    a, b = read_tensors(models["a"]), read_tensors(models["b"])
    assert torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"])
    assert torch.allclose(ours["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])


def test_ties_with_per_model_weights_and_densities(models, tmp_path):
    config = {"merge_method": "ties", "base_model": str(models["a"]), "dtype": "float32",
              "models": [{"model": str(models["b"]), "parameters": {"weight": 0.7, "density": 0.4}},
                         {"model": str(models["c"]), "parameters": {"weight": 0.5, "density": [0.9, 0.3]}},
                         {"model": str(models["d"]), "parameters": {"weight": -0.2, "density": 0.6}}],
              "parameters": {"normalize": True}}
    assert_same_tensors(*both(config, tmp_path))


def test_passthrough_with_overlapping_slices(models, tmp_path):
    config = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(models["b"]), "layer_range": [0, 3]}]},
                         {"sources": [{"model": str(models["c"]), "layer_range": [1, 4]}]}]}
    ours, theirs = both(config, tmp_path, config_may_fail=True)
    assert_same_tensors(ours, theirs, atol=0)
    out_config = json.loads((tmp_path / "qwenlab" / "config.json").read_text())
    assert out_config["num_hidden_layers"] == 6 and len(out_config["layer_types"]) == 6
    assert "lm_head.weight" not in ours
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "qwenlab").num_hidden_layers == 6
    c = read_tensors(models["c"])
    assert torch.equal(ours["model.layers.3.mlp.down_proj.weight"], c["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(ours["model.norm.weight"], c["model.norm.weight"])  # post weights: the last slice's model


@pytest.mark.parametrize("name, config", [
    ("linear", {"merge_method": "linear",
                "models": [{"model": "a", "parameters": {"weight": 0.6}},
                           {"model": "b", "parameters": {"weight": [0.1, 0.9]}},
                           {"model": "c", "parameters": {"weight": 0.3}}]}),
    ("task_arithmetic", {"merge_method": "task_arithmetic", "base_model": "a",
                         "models": [{"model": "b", "parameters": {"weight": 0.8}},
                                    {"model": "c", "parameters": {"weight": [{"filter": "mlp", "value": 0.2},
                                                                            {"value": 0.5}]}}],
                         "parameters": {"lambda": 0.9}}),
    ("breadcrumbs", {"merge_method": "breadcrumbs", "base_model": "a",
                     "models": [{"model": "b", "parameters": {"weight": 0.6, "density": 0.8, "gamma": 0.05}},
                                {"model": "c", "parameters": {"weight": 0.4, "density": 0.7, "gamma": 0.1}}]}),
    ("breadcrumbs_ties", {"merge_method": "breadcrumbs_ties", "base_model": "a",
                          "models": [{"model": "b", "parameters": {"weight": 0.6, "density": 0.8}},
                                     {"model": "c", "parameters": {"weight": 0.4, "density": 0.7}}]}),
    ("model_stock", {"merge_method": "model_stock", "base_model": "a",
                     "models": [{"model": "b"}, {"model": "c"}, {"model": "d"}]}),
    ("model_stock_filter_wise", {"merge_method": "model_stock", "base_model": "a",
                                 "models": [{"model": "b"}, {"model": "c"}], "parameters": {"filter_wise": True}}),
    ("nuslerp", {"merge_method": "nuslerp", "base_model": "a",
                 "models": [{"model": "b", "parameters": {"weight": 0.3}},
                            {"model": "c", "parameters": {"weight": 0.7}}]}),
])
def test_other_methods(models, tmp_path, name, config):
    config = json.loads(json.dumps(config))
    for entry in config["models"]:
        entry["model"] = str(models[entry["model"]])
    if "base_model" in config:
        config["base_model"] = str(models[config["base_model"]])
    config["dtype"] = "float32"
    assert_same_tensors(*both(config, tmp_path))


def test_untied_models_merge_their_lm_head(untied_models, tmp_path):
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(untied_models.values(), (1, 2))]}
    ours, theirs = both(config, tmp_path)
    assert "lm_head.weight" in ours
    assert_same_tensors(ours, theirs)


def test_bf16_output_of_fp32_inputs(models, tmp_path):
    config = {"merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16",
              "models": [{"model": str(models[n]), "parameters": {"weight": 1.0}} for n in "ab"]}
    ours, theirs = both(config, tmp_path)
    assert ours["model.norm.weight"].dtype == torch.bfloat16
    assert_same_tensors(ours, theirs, atol=0)


def _task_vectors(out, base):
    return {name: out[name] - base[name] for name in base if name in out}


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_statistics_match_mergekit(models, tmp_path, method):
    """The RNGs differ, so compare what DARE promises: the kept fraction and the L1 norm of the rescaled delta."""
    config = {"merge_method": method, "base_model": str(models["a"]), "dtype": "float32",
              "models": [{"model": str(models["b"]), "parameters": {"weight": 1.0, "density": 0.3}}]}
    ours, theirs = both(config, tmp_path, seed=3)
    base, model = read_tensors(models["a"]), read_tensors(models["b"])
    original = _task_vectors(model, base)
    for name, result in (("qwenlab", ours), ("mergekit", theirs)):
        delta = _task_vectors(result, base)
        big = "model.embed_tokens.weight"
        kept = torch.count_nonzero(delta[big]).item() / delta[big].numel()
        assert abs(kept - 0.3) < 0.02, (name, kept)
        for tensor in ("model.embed_tokens.weight", "model.layers.2.mlp.up_proj.weight"):
            assert delta[tensor].abs().sum().item() == pytest.approx(original[tensor].abs().sum().item(), rel=1e-4)
            kept_entries = delta[tensor] != 0
            assert torch.allclose(delta[tensor][kept_entries] / original[tensor][kept_entries],
                                  torch.full((int(kept_entries.sum()),), 1 / 0.3), rtol=0.1)
    # same seed, same tensors; the masks depend on tensor names, not on the order of work
    merge(config, tmp_path / "again", progress=False, seed=3)
    assert_same_tensors(read_tensors(tmp_path / "again"), ours, atol=0)


def test_ties_on_bf16_models_equals_mergekit_computing_in_float32(tmp_path):
    """qwenlab computes in float32 whatever the storage: it matches mergekit's float32 TIES except where
    magnitudes tie exactly at the trim threshold (frequent in bf16, where either choice keeps k entries);
    mergekit's own bf16 arithmetic differs from its float32 in most entries."""
    from tests.conftest import build_hf_model

    for seed, name in enumerate("abc"):
        build_hf_model(tmp_path / name, layers=1, hidden=128, intermediate=256, heads=4, vocab_size=512,
                       seed=seed, std=0.02, dtype=torch.bfloat16, with_tokenizer=False)
    config = {"merge_method": "ties", "base_model": str(tmp_path / "a"), "dtype": "bfloat16",
              "models": [{"model": str(tmp_path / "b"), "parameters": {"weight": 0.6, "density": 0.5}},
                         {"model": str(tmp_path / "c"), "parameters": {"weight": 0.4, "density": 0.7}}]}
    merge(config, tmp_path / "qwenlab", progress=False)
    ours = read_tensors(tmp_path / "qwenlab")
    theirs = run_mergekit({**config, "dtype": "float32", "out_dtype": "bfloat16"}, tmp_path / "mergekit")
    differing = sum(int((ours[n] != theirs[n]).sum()) for n in ours) / sum(t.numel() for t in ours.values())
    assert ours["model.norm.weight"].dtype == torch.bfloat16 and differing < 1e-3
