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
