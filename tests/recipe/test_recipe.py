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


def test_unknown_model_name_in_a_stage_fails_before_anything_is_written(tmp_path):
    with pytest.raises(QwenlabError, match=r"stages\[1\]\.eval: unknown model 'ghost'; known: nano, sft"):
        run_recipe(write(tmp_path, "stages: [{train: {task: reverse, as: sft}}, {eval: {models: [sft, ghost]}}]"),
                   tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_typo_in_a_stage_parameter_names_the_stage_and_the_field(tmp_path):
    with pytest.raises(QwenlabError, match=r"stages\[0\]\.eval\.sead: unknown parameter \(allowed: .*seed"):
        load_recipe(write(tmp_path, "stages: [{eval: {sead: 3}}]"))
    with pytest.raises(QwenlabError, match=r"stages\[0\]\.quantize\.bits\.0: Input should be 8 or 4, got 3"):
        load_recipe(write(tmp_path, "stages: [{quantize: {model: nano, bits: [3]}}]"))


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


# ---- names that become folders, and the run folder ------------------------------------------------
@pytest.fixture
def victim(tmp_path):
    """A folder outside the run that a bad name would reach."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    return folder


@pytest.mark.parametrize("stage,field", [("swarm", "as"), ("train", "as"), ("eval", "label")])
@pytest.mark.parametrize("name", ["ABS", "../victim", "../../victim", "models/../../victim", "..", "", ".hidden",
                                  "a+b", "x.partial"])
def test_names_that_are_paths_are_refused_when_the_recipe_is_read(tmp_path, victim, stage, field, name):
    name = str(victim) if name == "ABS" else name
    path = write(tmp_path, f"stages:\n  - {stage}: {{task: arithmetic, {field}: {json.dumps(name)}}}\n")
    with pytest.raises(QwenlabError, match=rf"stages\[0\]\.{stage}\.{field}: .* is not a plain name"):
        run_recipe(path, tmp_path / "run")
    assert (victim / "keep.txt").read_text() == "mine" and not (tmp_path / "run").exists()


def test_model_names_of_the_recipe_are_checked_too(tmp_path, victim):
    path = write(tmp_path, f"models: {{{json.dumps(str(victim))}: nano}}\nstages: [{{info: {{}}}}]\n")
    with pytest.raises(QwenlabError, match="models: .* is not a plain name"):
        load_recipe(path)


def test_stages_refuse_escaping_names_even_when_called_directly(tmp_path, victim):
    """Defense in depth, below the recipe reader: the swarm stage used to delete `as` wherever it pointed."""
    from qwenlab.recipe.context import RunContext
    from qwenlab.recipe.stages import run_stage

    ctx = RunContext(run_dir=tmp_path / "run")
    with pytest.raises(QwenlabError, match=r"swarm stage: as: .* is not a plain name"):
        run_stage("swarm", ctx, {"as": str(victim), "peers": 1, "rounds": 1})
    with pytest.raises(QwenlabError, match="is not a plain name"):
        ctx.new_model_dir("../../victim")
    (tmp_path / "run" / "models").mkdir(parents=True)
    (tmp_path / "run" / "models" / "planted").symlink_to(victim)  # a plain name whose folder is a symlink out
    with pytest.raises(QwenlabError, match="resolves outside the run's models folder"):
        ctx.new_model_dir("planted")
    assert (victim / "keep.txt").read_text() == "mine" and list(victim.iterdir()) == [victim / "keep.txt"]
    assert ctx.models == {}


def test_a_failed_run_is_marked_incomplete_and_a_finished_one_is_not(tiny_model_dir, tmp_path):
    from qwenlab.recipe.runner import INCOMPLETE

    (tmp_path / "not-a-model").mkdir()  # a folder, so the recipe reads; opening it fails at run time
    path = write(tmp_path, f"models: {{base: {tiny_model_dir}}}\n"
                           f"stages: [{{info: {{model: base}}}}, {{info: {{model: {tmp_path / 'not-a-model'}}}}}]\n")
    with pytest.raises(QwenlabError, match="config.json"):
        run_recipe(path, tmp_path / "failed")
    assert (tmp_path / "failed" / INCOMPLETE).read_text().startswith("Stopped at stage [2/2] info: failed")
    report = (tmp_path / "failed" / "report.md").read_text()
    assert "**Incomplete run**: stage [2/2] info failed" in report
    assert list(json.loads((tmp_path / "failed" / "figures.json").read_text())) == ["01-info"]
    run_recipe(write(tmp_path, f"models: {{base: {tiny_model_dir}}}\nstages: [{{info: {{model: base}}}}]\n"),
               tmp_path / "done")
    assert not (tmp_path / "done" / INCOMPLETE).exists() and (tmp_path / "done" / "report.md").is_file()


def test_two_runs_never_share_a_run_folder(tiny_model_dir, tmp_path, monkeypatch):
    import qwenlab.recipe.runner as runner

    path = write(tmp_path, f"models: {{base: {tiny_model_dir}}}\nstages: [{{info: {{model: base}}}}]\n")
    with pytest.raises(QwenlabError, match="exists and is not empty"):
        run_recipe(path, tmp_path)  # an explicit --out that holds something (here: the recipe itself)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner.time, "strftime", lambda *_: "20250101-000000")  # both start "in the same second"
    first, second = run_recipe(path), run_recipe(path)
    assert first.run_dir != second.run_dir
    assert sorted(p.name for p in (tmp_path / "qwenlab-runs").iterdir()) == ["20250101-000000", "20250101-000000-2"]
    assert all((ctx.run_dir / "report.md").is_file() for ctx in (first, second))


def test_card_of_a_model_named_by_its_path_stays_inside_the_run(tiny_model_dir, tmp_path):
    """A stage's `models` may name an input by its path; its card still goes to cards/ in the run."""
    import shutil

    outside = tmp_path / "inputs" / "my model"
    shutil.copytree(tiny_model_dir, outside)
    path = write(tmp_path, f"stages:\n  - card: {{models: [{json.dumps(str(outside))}, "
                           f"{json.dumps(str(outside / '..' / 'my model'))}]}}\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    ctx = run_recipe(path, tmp_path / "run")
    cards = ctx.figures["01-card"]["cards"]
    assert sorted(cards.values()) == ["cards/my-model-2.md", "cards/my-model.md"]
    assert all((tmp_path / "run" / p).is_file() for p in cards.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["run"])
    assert not (outside / "README.md").exists() and not (outside.parent / "my model.md").exists()
