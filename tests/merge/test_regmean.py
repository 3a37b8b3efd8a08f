"""RegMean: the closed form against an independent least-squares solve, the Gram matrices of a real model's
linear inputs, and the data a config must (or must not) give."""

import pytest
import torch

from qwenlab.errors import QwenlabError
from qwenlab.merge.methods.regmean import merge_regmean


def _features(rows: int, width: int, directions: slice, seed: int) -> torch.Tensor:
    x = torch.zeros(rows, width)
    x[:, directions] = torch.randn(rows, directions.stop - directions.start, generator=torch.Generator().manual_seed(seed))
    return x


def test_models_whose_inputs_live_in_different_directions_each_keep_their_own_map():
    x1, x2 = _features(40, 8, slice(0, 4), 0), _features(40, 8, slice(4, 8), 1)
    w1, w2 = torch.randn(5, 8), torch.randn(5, 8)
    merged = merge_regmean([w1, w2], {"weight": [1.0, 1.0], "alpha": 1.0, "ridge": 0.0,
                                      "grams": [x1.T @ x1, x2.T @ x2]})
    torch.testing.assert_close(x1 @ merged.T, x1 @ w1.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x2 @ merged.T, x2 @ w2.T, atol=1e-4, rtol=1e-4)
    # task arithmetic's average would serve neither
    assert not torch.allclose(x1 @ ((w1 + w2) / 2).T, x1 @ w1.T, atol=1e-2)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 2.5)])
def test_the_closed_form_is_the_weighted_least_squares_solution(weights):
    x1, x2 = torch.randn(30, 6, dtype=torch.float64), torch.randn(20, 6, dtype=torch.float64)
    w1, w2 = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    merged = merge_regmean([w1.float(), w2.float()], {"weight": list(weights), "alpha": 1.0, "ridge": 0.0,
                                                      "grams": [(x1.T @ x1).float(), (x2.T @ x2).float()]})
    a = torch.cat([weights[0] ** 0.5 * x1, weights[1] ** 0.5 * x2])
    b = torch.cat([weights[0] ** 0.5 * x1 @ w1.T, weights[1] ** 0.5 * x2 @ w2.T])
    expected = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(merged.double(), expected, atol=1e-4, rtol=1e-4)


def test_alpha_zero_is_a_per_feature_weighted_average_and_non_linears_a_plain_one():
    x1, x2 = torch.randn(30, 4), torch.randn(30, 4)
    g1, g2 = x1.T @ x1, x2.T @ x2
    w1, w2 = torch.randn(2, 4), torch.randn(2, 4)
    merged = merge_regmean([w1, w2], {"weight": [1.0, 1.0], "alpha": 0.0, "ridge": 0.0, "grams": [g1, g2]})
    d1, d2 = g1.diagonal(), g2.diagonal()
    torch.testing.assert_close(merged, (w1 * d1 + w2 * d2) / (d1 + d2), atol=1e-4, rtol=1e-4)
    norm1, norm2 = torch.randn(4), torch.randn(4)
    averaged = merge_regmean([norm1, norm2], {"weight": [1.0, 3.0], "alpha": 1.0, "grams": [None, None]})
    torch.testing.assert_close(averaged, (norm1 + 3 * norm2) / 4)


def test_the_ridge_keeps_directions_the_data_barely_reaches_near_the_weighted_average():
    # Two models that disagree on nearly the same inputs: plain least squares separates them along the tiny
    # direction that tells the inputs apart, with weights ~1/delta (which int8/int4 groups cannot hold); the
    # ridge keeps that direction near the models' average instead.
    ones = 1 + 0.01 * torch.randn(200, 1, generator=torch.Generator().manual_seed(0))
    x1, x2 = torch.cat([ones, ones + 0.01], 1), torch.cat([ones, ones - 0.01], 1)
    w1, w2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])
    grams = [x1.T @ x1, x2.T @ x2]
    plain = merge_regmean([w1, w2], {"weight": [1.0, 1.0], "alpha": 1.0, "ridge": 0.0, "grams": grams})
    pulled = merge_regmean([w1, w2], {"weight": [1.0, 1.0], "alpha": 1.0, "grams": grams})  # the default ridge
    assert plain.abs().max() > 20
    assert pulled.abs().max() < plain.abs().max() / 5
    # where the data does tell the models apart, the default ridge changes the fit by little
    x1, x2 = _features(40, 8, slice(0, 4), 0), _features(40, 8, slice(4, 8), 1)
    w1, w2 = torch.randn(5, 8), torch.randn(5, 8)
    merged = merge_regmean([w1, w2], {"weight": [1.0, 1.0], "alpha": 1.0, "grams": [x1.T @ x1, x2.T @ x2]})
    assert (x1 @ merged.T - x1 @ w1.T).abs().max() < 0.05 and (x2 @ merged.T - x2 @ w2.T).abs().max() < 0.05


def test_grams_count_every_real_token_and_no_padding():
    from qwenlab.merge.activations import linear_input_grams
    from qwenlab.model import load_model
    from qwenlab.nano import nano_path

    model = load_model(nano_path())
    rows = [[5, 9, 13, 2, 7], [3, 8], [11, 4, 6]]
    together = linear_input_grams(model, rows, pad_id=0)
    alone = [linear_input_grams(model, [row], pad_id=0) for row in rows]
    assert set(together) == {f"model.layers.{i}.{m}.weight" for i in range(4) for m in
                             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    for name, gram in together.items():
        torch.testing.assert_close(gram, sum(g[name] for g in alone), atol=1e-3, rtol=1e-4)
    # the first layer's q_proj sees the normed embeddings: check one matrix by hand
    layer = model.model.layers[0]
    x = layer.input_layernorm(model.model.embed_tokens(torch.tensor([rows[1]])))[0].double()
    torch.testing.assert_close(alone[1]["model.layers.0.self_attn.q_proj.weight"], (x.T @ x).float(),
                               atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def specialist(tmp_path_factory):
    from qwenlab.nano import nano_path
    from tests.bench.conftest import write_lora

    return write_lora(nano_path(), tmp_path_factory.mktemp("regmean") / "a", rank=2, seed=0)


def _config(specialist, **changes):
    from qwenlab.nano import nano_path

    config = {"merge_method": "regmean", "dtype": "float32", "models": [
        {"model": f"{nano_path()}+{specialist}", "parameters": {"weight": 2.0}, "data": {"task": "arithmetic", "n": 8}},
        {"model": str(nano_path()), "data": {"tasks": ["reverse", "sort_letters"], "n": 8}}]}
    config.update(changes)
    return config


def test_a_written_regmean_merge_solves_each_linear_from_both_models_data(tmp_path, specialist):
    from qwenlab.checkpoint import open_checkpoint
    from qwenlab.merge import merge, plan_merge
    from qwenlab.merge.activations import model_grams

    out = merge(_config(specialist), tmp_path / "merged", progress=False)
    merged = open_checkpoint(out)
    plan, sources = plan_merge(_config(specialist))
    a, base = (sources[entry.model] for entry in plan.config.models)
    grams = [model_grams(src, entry.data, "test") for src, entry in zip((a, base), plan.config.models)]
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = merge_regmean([a.get(name).float(), base.get(name).float()],
                             {"weight": [2.0, 1.0], "alpha": 1.0, "ridge": 0.001, "grams": [g[name] for g in grams]})
    torch.testing.assert_close(merged.get(name).float(), expected)
    assert not torch.allclose(expected, a.get(name).float()) and not torch.allclose(expected, base.get(name).float())
    norm = "model.layers.1.input_layernorm.weight"
    torch.testing.assert_close(merged.get(norm).float(), base.get(norm).float())  # a LoRA leaves norms alone


def test_regmean_without_data_and_data_on_other_methods_are_refused(tmp_path, specialist):
    from qwenlab.merge import merge

    config = _config(specialist)
    del config["models"][1]["data"]
    with pytest.raises(QwenlabError, match=r"models\[1\]\.data: regmean measures each model on its own examples"):
        merge(config, tmp_path / "a", progress=False)
    with pytest.raises(QwenlabError, match=r"models\[0\]\.data: only regmean and regmean_sequential use data"):
        merge(_config(specialist, merge_method="linear"), tmp_path / "b", progress=False)
    config = _config(specialist)
    config["models"][0]["data"] = {"task": "no_such_task"}
    with pytest.raises(QwenlabError, match=r"models\[0\]\.data: .*no_such_task"):
        merge(config, tmp_path / "c", progress=False)
    config["models"][0]["data"] = {"file": str(tmp_path / "missing.jsonl")}
    with pytest.raises(QwenlabError, match=r"models\[0\]\.data\.file: .*missing.jsonl not found"):
        merge(config, tmp_path / "e", progress=False)
    config["models"][0]["data"] = {"task": "arithmetic", "file": "x.jsonl"}
    with pytest.raises(QwenlabError, match=r"models\[0\]\.data.*exactly one of task, tasks or file"):
        merge(config, tmp_path / "d", progress=False)
    assert not any((tmp_path / d).exists() for d in "abcde")


def test_regmean_data_from_a_chat_file_names_a_bad_line(tmp_path, specialist):
    from qwenlab.merge import merge

    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'
                     '{"text": "plain text counts too"}\n')
    config = _config(specialist)
    config["models"][1]["data"] = {"file": str(chats), "n": 4}
    assert merge(config, tmp_path / "ok", progress=False).is_dir()
    chats.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n{"prompt": 3}\n')
    with pytest.raises(QwenlabError, match=r"chats.jsonl:2: expected 'messages'"):
        merge(config, tmp_path / "bad", progress=False)
