"""The recipe runner: YAML validation, stages in order, report.md and figures.json."""

import json

import pytest

from qwenlab.errors import QwenlabError
from qwenlab.recipe import BUILTIN_RECIPE, load_recipe, run_recipe


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_builtin_recipe_is_valid():
    recipe = load_recipe(None)
    assert recipe["stages"] and load_recipe(BUILTIN_RECIPE) == recipe


def test_runs_stages_and_writes_report(tiny_model_dir, tmp_path):
    path = write(tmp_path, f"""
name: tiny
models: {{base: {tiny_model_dir}}}
stages:
  - info: {{model: base}}
  - eval: {{models: [base], tasks: [arithmetic, reverse], n: 4}}
  - chat: {{model: base, prompts: ["hi"], max_new_tokens: 3}}
""")
    ctx = run_recipe(path, tmp_path / "run")
    report = (tmp_path / "run" / "report.md").read_text()
    figures = json.loads((tmp_path / "run" / "figures.json").read_text())
    assert "# qwenlab run: tiny" in report and "| base |" in report and "Sample chats" in report
    assert list(figures) == ["01-info", "02-eval", "03-chat"]
    assert figures["01-info"]["architecture"]["layers"] == 3
    assert set(figures["02-eval"]["base"]) == {"arithmetic", "reverse"}
    assert ctx.models["base"] == str(tiny_model_dir)


@pytest.mark.parametrize("text,pattern", [
    ("stages: []", "non-empty 'stages'"),
    ("stages: [{bogus: {}}]", "unknown stage 'bogus'"),
    ("stages: [{eval: 3}]", r"stages\[0\]\.eval: expected a mapping"),
    ("stages: [oops", "invalid YAML"),
    ("models: [a]\nstages: [{info: {}}]", "'models' must map"),
])
def test_bad_recipes_name_the_problem(tmp_path, text, pattern):
    with pytest.raises(QwenlabError, match=pattern):
        load_recipe(write(tmp_path, text))


def test_unknown_model_name_in_a_stage(tmp_path):
    with pytest.raises(QwenlabError, match="unknown model 'ghost'"):
        run_recipe(write(tmp_path, "stages: [{info: {model: ghost}}]"), tmp_path / "run")


def test_quantize_stage_benches_and_evaluates_each_variant(tmp_path):
    from tests.conftest import build_hf_model
    from tests.quant.conftest import TINY32

    build_hf_model(tmp_path / "m32", **TINY32)
    path = write(tmp_path, f"""
models: {{base: {tmp_path / 'm32'}}}
stages:
  - quantize: {{model: base, bits: [8, 4], group_size: 32, tasks: [reverse], n: 2, ctx: 8, gen: 4, runs: 1}}
""")
    ctx = run_recipe(path, tmp_path / "run")
    figures = json.loads((tmp_path / "run" / "figures.json").read_text())["01-quantize"]
    variants = {k: v for k, v in figures.items() if k.startswith("base")}
    assert list(variants) == ["base", "base-int8", "base-int4"]
    for label, row in variants.items():
        assert row["ttft_s"] > 0 and row["decode_tokens_per_s"] > 0 and row["peak_rss_bytes"] > 0
        assert 0.0 <= row["accuracy"]["reverse"] <= 1.0
    assert "int4" in figures["base-int4"]["weights"] and "base-int4" in ctx.models
    assert "| base-int4 |" in (tmp_path / "run" / "report.md").read_text()
