"""The recipe's merge stage: default-parameter merges, forgetting on keep_tasks, and a tuned merge found by
merge-search on validation instances (another seed than the report's)."""

import json

import pytest
import torch

from qwenlab.errors import QwenlabError
from qwenlab.recipe import load_recipe, run_recipe
from qwenlab.recipe.stages.merge import default_point, method_config, search_space


@pytest.fixture(scope="module")
def specialists(tmp_path_factory):
    from qwenlab.nano import nano_path
    from tests.bench.conftest import write_lora

    root = tmp_path_factory.mktemp("specialists")
    return write_lora(nano_path(), root / "a", rank=2, seed=0), write_lora(nano_path(), root / "b", rank=2, seed=1)


def recipe(tmp_path, specialists, search: str, methods: str = "[task_arithmetic]") -> object:
    a, b = specialists
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
name: merge-stage
models: {{nano: nano, a: {a}, b: {b}}}
stages:
  - merge: {{base: nano, models: [a, b], tasks: [arithmetic, reverse], keep_tasks: [sort_letters],
             methods: {methods}, n: 6, difficulty: 1{search}}}
""")
    return path


def test_the_tuned_merge_is_searched_on_validation_and_reported_beside_the_defaults(tmp_path, specialists):
    run = run_recipe(recipe(tmp_path, specialists,
                            ", search: {method: task_arithmetic, trials: 3, n: 6, seed: 1, objective: mean}"),
                     tmp_path / "run")
    figures = json.loads((tmp_path / "run" / "figures.json").read_text())["01-merge"]
    assert set(figures["outputs"]) == {"merge-task_arithmetic", "merge-tuned"} and "merge-tuned" in run.models
    assert set(figures["accuracy"]) == {"nano", "a", "b", "merge-task_arithmetic", "merge-tuned"}
    assert all(set(v) == {"arithmetic", "reverse", "sort_letters"} for v in figures["accuracy"].values())
    search = json.loads((tmp_path / "run" / "merge-search" / "merge_search.json").read_text())
    assert search["seed"] == 1 and search["tasks"] == ["arithmetic", "reverse", "sort_letters"]
    # The defaults are the first trial, so the tuned merge is at least as good as them on validation.
    first = search["trials"][0]
    assert first["params"] == default_point("task_arithmetic")
    assert search["best"]["objective"] >= first["objective"]
    assert first["objective"] == pytest.approx(sum(first["tasks"].values()) / 3)  # objective: mean
    if figures["search"]["method"] == "task_arithmetic":  # else a default merge won on validation
        assert figures["search"]["params"] == search["best"]["params"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| merge-tuned |" in report and "kept of nano (sort_letters)" in report and "validation" in report


def test_searching_on_the_reported_instances_is_refused(tmp_path, specialists):
    with pytest.raises(QwenlabError, match="search.seed must differ"):
        run_recipe(recipe(tmp_path, specialists, ", search: {trials: 2, seed: 0}"), tmp_path / "run")


def test_every_method_has_a_search_space_whose_first_point_is_its_default():
    from qwenlab.merge.search import get_path

    for method, keeps in (("linear", False), ("ties", False), ("slerp", False), ("task_arithmetic", False),
                          ("regmean", False), ("regmean", True), ("regmean_sequential", False),
                          ("regmean_sequential", True)):
        config = method_config(method, "base", "a", "b", ("arithmetic", "reverse"), ("sort_letters",) if keeps else ())
        assert len(config["models"]) == 2 + keeps
        for entry in search_space(method, 1, keeps):
            parent, key = get_path(config, entry["path"])
            value = parent[key]
            names = [entry["path"]] if entry.get("groups", 1) == 1 else \
                [f"{entry['path']}#{g}" for g in range(entry["groups"])]
            assert all(default_point(method, 1, keeps)[name] == value for name in names), (method, entry)


def test_an_unknown_search_method_is_a_recipe_error(tmp_path, specialists):
    with pytest.raises(QwenlabError, match="search"):
        load_recipe(recipe(tmp_path, specialists, ", search: {method: dare}"))


def test_the_kept_objective_is_the_worst_share_kept_and_the_tuned_merge_beats_every_default_on_validation(
        tmp_path, specialists):
    from qwenlab.eval.task_eval import evaluate_tasks
    from qwenlab.loading import load
    from qwenlab.nano import nano_path

    run_recipe(recipe(tmp_path, specialists, ", search: {method: task_arithmetic, trials: 4, n: 8, seed: 1, "
                      "layer_groups: 2}", methods="[linear, task_arithmetic]"), tmp_path / "run")
    figures = json.loads((tmp_path / "run" / "figures.json").read_text())["01-merge"]
    search = json.loads((tmp_path / "run" / "merge-search" / "merge_search.json").read_text())
    tasks = ["arithmetic", "reverse", "sort_letters"]

    def validation(path, adapters=()):
        model, tokenizer, _ = load(str(path), "fp32", list(adapters))
        return {t: r.accuracy for t, r in evaluate_tasks(model, tokenizer, tasks, n=8, seed=1, difficulty=1,
                                                         progress=False).items()}

    a, b = specialists
    expected = {"arithmetic": validation(nano_path(), [a])["arithmetic"],  # each specialist's own skill
                "reverse": validation(nano_path(), [b])["reverse"],
                "sort_letters": validation(nano_path())["sort_letters"]}  # a kept skill: the base's
    expected = {t: v for t, v in expected.items() if v > 0}
    assert search["reference"] == pytest.approx(expected) and search["tasks"] == list(expected)
    for trial in search["trials"]:
        assert trial["objective"] == pytest.approx(min(trial["tasks"][t] / expected[t] for t in expected))
    assert search["trials"][0]["params"] == default_point("task_arithmetic", 2)
    assert len(search["trials"][0]["params"]) == 4  # two weights, each a 2-point curve across the layers
    defaults = figures["search"]["defaults_on_validation"]
    assert set(defaults) == {"merge-linear", "merge-task_arithmetic"}
    for label, measured in defaults.items():
        again = validation(figures["outputs"][label])
        assert measured["objective"] == pytest.approx(min(again[t] / expected[t] for t in expected), abs=1e-3)
    tuned = validation(figures["outputs"]["merge-tuned"])
    tuned_objective = min(tuned[t] / expected[t] for t in expected)
    assert tuned_objective == pytest.approx(figures["search"]["validation_objective"], abs=1e-3)
    assert tuned_objective >= max(d["objective"] for d in defaults.values()) - 1e-3


def test_refine_sets_its_parameters_on_the_best_trial_for_the_written_merge(tmp_path, specialists):
    # regmean_sequential's distillation is too slow for every trial: the stage writes the best trial's config with
    # it, measures that merge on validation again, and that is what merge-tuned holds (unless a default beat it).
    # A strong ridge keeps the solve far from both specialists, so that the distillation has something to do.
    from qwenlab.checkpoint import open_checkpoint
    from qwenlab.merge import merge

    run_recipe(recipe(tmp_path, specialists, ", search: {method: regmean_sequential, trials: 2, n: 6, seed: 1, "
                      "refine: {ridge: 10.0, distill_steps: 10}}"), tmp_path / "run")
    figures = json.loads((tmp_path / "run" / "figures.json").read_text())["01-merge"]
    search = json.loads((tmp_path / "run" / "merge-search" / "merge_search.json").read_text())
    tuned = figures["search"]
    assert tuned["best_trial_objective"] == search["best"]["objective"]
    refined = tuned["refined_on_validation"]
    assert refined is not None and tuned["validation_objective"] >= refined["objective"]
    if tuned["method"] != "regmean_sequential":  # a default merge scored higher on validation
        assert tuned["validation_objective"] > refined["objective"]
        return
    assert tuned["refine"] == {"ridge": 10.0, "distill_steps": 10}
    assert tuned["validation_objective"] == refined["objective"]
    best = search["best"]["config"]

    def with_parameters(**parameters):
        return {**best, "parameters": {**(best.get("parameters") or {}), **parameters}}
    again = open_checkpoint(merge(with_parameters(ridge=10.0, distill_steps=10), tmp_path / "again", progress=False))
    written = open_checkpoint(figures["outputs"]["merge-tuned"])
    plain = open_checkpoint(merge(with_parameters(ridge=10.0), tmp_path / "plain", progress=False))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(written.get(name), again.get(name))
    assert not torch.equal(written.get(name), plain.get(name))  # the distillation moved it


@pytest.mark.parametrize("refine, message", [
    ("{distil_steps: 3}", r"refine\.distil_steps: not a parameter of regmean_sequential"),
    ("{distill_steps: -2}", r"refine\.distill_steps: distill_steps = -2 is outside"),
    ("{distill_lr: 0}", r"refine\.distill_lr: distill_lr = 0 is outside"),
])
def test_a_refinement_the_method_cannot_take_is_a_recipe_error(tmp_path, specialists, refine, message):
    with pytest.raises(QwenlabError, match=message):
        load_recipe(recipe(tmp_path, specialists, f", search: {{method: regmean_sequential, refine: {refine}}}"))
