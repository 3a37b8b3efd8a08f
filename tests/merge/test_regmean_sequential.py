"""regmean_sequential: the layer-by-layer solve against an independent least-squares fit, a model merged with
itself coming back unchanged, the merged stream tracking each model better than RegMean's, and its errors."""

import shutil

import pytest
import torch

from qwenlab.errors import QwenlabError

MODULES = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def _lora_everywhere(base, out, seed: int, scale: float = 0.3):
    """A rank-2 LoRA on every linear of nano (o_proj and down_proj too: the writers to the residual stream)."""
    from qwenlab.adapters import LoraAdapter, write_adapter
    from qwenlab.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(base)
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(checkpoint.config.num_hidden_layers):
        for block, names in MODULES.items():
            for name in names:
                out_features, in_features = checkpoint.shape(f"model.layers.{layer}.{block}.{name}.weight")
                a = torch.randn(2, in_features, generator=generator) * scale
                b = torch.randn(out_features, 2, generator=generator) * scale
                modules[f"model.layers.{layer}.{block}.{name}"] = (a, b)
    return write_adapter(LoraAdapter(modules=modules, alpha=4, base_model=str(base)), out, tokenizer_from=base)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from qwenlab.nano import nano_path

    folder = tmp_path_factory.mktemp("regmean_sequential")
    first = _lora_everywhere(nano_path(), folder / "a", seed=0)
    second = _lora_everywhere(nano_path(), folder / "b", seed=1)
    twin = folder / "a-copy"
    shutil.copytree(first, twin)
    return first, second, twin


def _config(*models, **parameters):
    """models: (reference, weight, data) each."""
    return {"merge_method": "regmean_sequential", "dtype": "float32", "parameters": parameters,
            "models": [{"model": str(m), "parameters": {"weight": w}, "data": d} for m, w, d in models]}


def _solved(config):
    from qwenlab.merge import plan_merge
    from qwenlab.merge.layerwise import solve_layers

    plan, sources = plan_merge(config)
    return solve_layers(plan, sources, progress=False), plan, sources


ARITHMETIC = {"task": "arithmetic", "n": 12}
REVERSE = {"task": "reverse", "n": 10}


@pytest.mark.parametrize("match_outputs", [True, False])
def test_a_model_merged_with_itself_comes_back_unchanged(adapters, match_outputs):
    # Both inputs are one model: every fit has that model's weight as an exact solution, on any data, so the
    # step-by-step forward of the merged layer must reproduce the model's own layer exactly for this to hold.
    from qwenlab.nano import nano_path

    first, _, twin = adapters
    solved, _, sources = _solved(_config((f"{nano_path()}+{first}", 1.0, ARITHMETIC),
                                         (f"{nano_path()}+{twin}", 2.0, REVERSE), match_outputs=match_outputs))
    source = sources[f"{nano_path()}+{first}"]
    assert len(solved) == 4 * 7
    for name, weight in solved.items():
        torch.testing.assert_close(weight, source.get(name).float(), atol=2e-4, rtol=2e-3)


def test_the_first_layers_readers_are_the_weighted_least_squares_fit_on_each_models_tokens(adapters):
    # Layer 0's q_proj reads the normed embeddings, the same in every model (a LoRA leaves them alone), so its
    # fit can be written down directly: each model's real tokens, the prefix all rows share counted once, and the
    # ridge (a few hundred tokens leave some of the 256 directions unseen).
    from qwenlab.merge.activations import data_token_rows, runnable_model
    from qwenlab.merge.config import ActivationData
    from qwenlab.nano import nano_path

    first, second, _ = adapters
    weights = (1.0, 3.0)
    refs = (f"{nano_path()}+{first}", f"{nano_path()}+{second}")
    solved, _, sources = _solved(_config((refs[0], weights[0], ARITHMETIC), (refs[1], weights[1], REVERSE), ridge=0.01))
    name = "model.layers.0.self_attn.q_proj.weight"
    rows_a, rows_b = [], []
    for ref, data, rows in ((refs[0], ARITHMETIC, rows_a), (refs[1], REVERSE, rows_b)):
        token_rows, _, _ = data_token_rows(sources[ref], ActivationData(**data), "test")
        model = runnable_model(sources[ref])
        shared = 0
        while all(len(r) > shared and r[shared] == token_rows[0][shared] for r in token_rows):
            shared += 1
        for i, row in enumerate(token_rows):
            with torch.no_grad():
                x = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(row)))
            rows.append(x if i == 0 else x[shared:])
    xs = [torch.cat(rows_a).double(), torch.cat(rows_b).double()]
    ws = [sources[ref].get(name).double() for ref in refs]
    # the ridge as extra rows: sqrt(rho)·I with targets sqrt(rho)·W̄ᵀ (rho = ridge x the mean diagonal of Σ λᵢXᵢᵀXᵢ)
    rho = 0.01 * sum(w * x.pow(2).sum(0) for w, x in zip(weights, xs)).mean()
    average = sum(w * own for w, own in zip(weights, ws)) / sum(weights)
    a = torch.cat([w ** 0.5 * x for w, x in zip(weights, xs)] + [rho ** 0.5 * torch.eye(xs[0].shape[1])])
    b = torch.cat([w ** 0.5 * x @ own.T for w, x, own in zip(weights, xs, ws)] + [rho ** 0.5 * average.T])
    expected = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(solved[name].double(), expected, atol=2e-3, rtol=2e-3)
    assert not torch.allclose(solved[name].double(), ws[0], atol=1e-2)


def _stream_error(model, teacher, rows, pad_id) -> float:
    """Mean squared gap between two models' final hidden states over the real tokens of `rows`."""
    from qwenlab.merge.activations import token_batches

    total, count = 0.0, 0
    with torch.no_grad():
        for tokens, mask in token_batches(rows, pad_id):
            gap = model.final_hidden(tokens) - teacher.final_hidden(tokens)
            total += gap[mask].pow(2).sum().item()
            count += int(mask.sum())
    return total / count


def test_the_merged_stream_tracks_each_model_on_its_data_closer_than_regmeans(adapters):
    from qwenlab.merge.activations import data_token_rows, runnable_model
    from qwenlab.merge.config import ActivationData
    from qwenlab.merge.search import InMemoryMerger
    from qwenlab.nano import nano_path

    first, second, _ = adapters
    refs = (f"{nano_path()}+{first}", f"{nano_path()}+{second}")
    sequential = _config((refs[0], 1.0, ARITHMETIC), (refs[1], 1.0, REVERSE))
    plain = {**sequential, "merge_method": "regmean", "parameters": {}}
    merged = {}
    for name, config in (("sequential", sequential), ("regmean", plain)):
        merger = InMemoryMerger(config)
        merger.load(config)
        merged[name] = merger.model
    for ref, data in zip(refs, (ARITHMETIC, REVERSE)):
        source = merger.sources[ref]
        rows, pad_id, _ = data_token_rows(source, ActivationData(**data), "test")
        teacher = runnable_model(source)
        errors = {name: _stream_error(model, teacher, rows, pad_id) for name, model in merged.items()}
        assert errors["sequential"] < 0.7 * errors["regmean"], errors


def test_a_written_merge_holds_the_solved_linears_and_averages_the_rest(tmp_path, adapters):
    from qwenlab.checkpoint import open_checkpoint
    from qwenlab.merge import merge
    from qwenlab.nano import nano_path

    first, second, _ = adapters
    config = _config((f"{nano_path()}+{first}", 1.0, ARITHMETIC), (f"{nano_path()}+{second}", 3.0, REVERSE))
    out = open_checkpoint(merge(config, tmp_path / "merged", progress=False))
    solved, _, sources = _solved(config)
    for name, weight in solved.items():
        torch.testing.assert_close(out.get(name).float(), weight)
    norm = "model.layers.2.post_attention_layernorm.weight"
    torch.testing.assert_close(out.get(norm).float(), sources[f"{nano_path()}+{first}"].get(norm).float())


def test_bad_inputs_fail_with_the_field_named(tmp_path, adapters):
    from qwenlab.merge import merge
    from qwenlab.nano import nano_path

    first, second, _ = adapters
    config = _config((f"{nano_path()}+{first}", 1.0, ARITHMETIC), (f"{nano_path()}+{second}", 1.0, REVERSE))
    del config["models"][1]["data"]
    with pytest.raises(QwenlabError, match=r"models\[1\]\.data: regmean_sequential measures each model"):
        merge(config, tmp_path / "a", progress=False)
    config = _config((f"{nano_path()}+{first}", 0.0, ARITHMETIC), (f"{nano_path()}+{second}", 0.0, REVERSE))
    with pytest.raises(QwenlabError, match="weights .* must sum to more than 0"):
        merge(config, tmp_path / "b", progress=False)
    config = _config((f"{nano_path()}+{first}", 1.0, ARITHMETIC), (f"{nano_path()}+{second}", 1.0, REVERSE),
                     match_outputs=3)
    with pytest.raises(QwenlabError, match="match_outputs"):
        merge(config, tmp_path / "c", progress=False)
    config = _config((f"{nano_path()}+{first}", 1.0, ARITHMETIC), (f"{nano_path()}+{second}", 1.0, REVERSE))
    config["base_model"] = str(nano_path())  # an input with no data of its own
    with pytest.raises(QwenlabError, match="every input needs data"):
        merge(config, tmp_path / "d", progress=False)
    assert not any((tmp_path / d).exists() for d in "abcd")
