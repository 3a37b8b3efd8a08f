"""Gradients, filters and precedence resolve per tensor exactly as mergekit does."""

import pytest

from qwenlab.merge.config import load_merge_config
from qwenlab.merge.methods import METHODS
from qwenlab.merge.parameters import evaluate_setting, gradient_value

T_PARAMETER = METHODS["slerp"].parameter("t")


def layer_t(index: int, layers: int) -> float:
    return index / (layers - 1) if layers > 1 else 1.0


@pytest.mark.parametrize("layer, expected", [(0, 0.0), (1, 0.0741), (7, 0.4926), (27, 1.0)])
def test_gradient_interpolation_over_28_layers(layer, expected):
    assert gradient_value([0, 0.5, 0.3, 0.7, 1], layer_t(layer, 28)) == pytest.approx(expected, abs=5e-5)


def test_gradient_matches_mergekit_evaluate_setting():
    from mergekit.config import evaluate_setting as mergekit_evaluate

    for values in ([0, 0.5, 1, 0.5, 0], [0.2, 0.9], [1.0]):
        for layer in range(7):
            t = layer_t(layer, 7)
            ours = gradient_value(values, t)
            assert ours == pytest.approx(mergekit_evaluate("x", values, t, validate=float), abs=1e-12)


def test_filters_first_match_wins_and_no_match_falls_through():
    config = load_merge_config({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}],
                                "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]},
                                                     {"filter": "attn", "value": 0.9},
                                                     {"filter": "mlp", "value": 0.3}]}})
    setting = config.parameters["t"]
    assert evaluate_setting(T_PARAMETER, setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate_setting(T_PARAMETER, setting, "model.layers.0.mlp.up_proj.weight", 0.5) == 0.3
    assert evaluate_setting(T_PARAMETER, setting, "model.norm.weight", 0.5) is None
    wildcard = load_merge_config({"merge_method": "slerp", "models": [{"model": "a"}],
                                  "parameters": {"t": [{"filter": "*", "value": 0.25}]}}).parameters["t"]
    assert evaluate_setting(T_PARAMETER, wildcard, "model.norm.weight", 0.0) == 0.25


def test_numeric_strings_validate_like_mergekit():
    assert evaluate_setting(T_PARAMETER, "5e-1", "x", 0.0) == 0.5
    assert evaluate_setting(METHODS["ties"].parameter("normalize"), [True, False], "x", 0.9) is True


def test_plan_precedence_and_embeddings_at_t0(models):
    from qwenlab.merge import plan_merge

    config = {"merge_method": "ties", "base_model": str(models["a"]),
              "models": [{"model": str(models["b"]), "parameters": {"weight": 0.7, "density": [0.2, 0.8]}},
                         {"model": str(models["c"])}],
              "parameters": {"weight": 0.1, "density": 0.5, "lambda": [1.0, 2.0],
                             "normalize": False}}
    plan, _ = plan_merge(config)
    by_name = {t.name: t for t in plan.tensors}
    embed = by_name["model.embed_tokens.weight"]
    assert embed.params["density"] == [0.2, 0.5] and embed.params["lambda"] == 1.0  # t = 0
    last = by_name["model.layers.3.mlp.up_proj.weight"]
    assert last.params["weight"] == [0.7, 0.1] and last.params["density"] == pytest.approx([0.8, 0.5])
    assert last.params["lambda"] == 2.0 and last.params["normalize"] is False
    assert [m for m, _ in last.inputs][0] == str(models["a"])  # the base first
