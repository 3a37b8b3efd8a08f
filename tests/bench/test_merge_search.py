"""`qwenlab merge-search`: in-memory merges equal `qwenlab merge`, Optuna trials, the Pareto front."""

import json

import pytest
import torch
import yaml

from qwenlab.merge.search import (InMemoryMerger, SearchSpace, Trial, apply_params, load_search_config,
                                        pareto_front)
from qwenlab.checkpoint import open_checkpoint
from qwenlab.cli import main
from qwenlab.errors import QwenlabError

from tests.bench.conftest import slerp_config


def search_file(root, tmp_path, **extra):
    config = {"merge": slerp_config(root, 0.5),
              "search": [{"path": "parameters.t", "low": 0.0, "high": 1.0, "groups": 2}],
              "objective": {"tasks": ["arithmetic"], "n": 2}, "trials": 2, "sampler": "random", **extra}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_in_memory_merge_equals_written_merge(family):
    merger = InMemoryMerger(slerp_config(family, 0.5))
    merger.load(slerp_config(family, 0.3))
    written = open_checkpoint(family / "slerp-0.3")
    state = merger.model.state_dict()
    for name in written.tensor_names():
        assert torch.equal(state[name], written.get(name).float()), name
    merger.close()


def test_search_space_paths_groups_and_filters(family):
    merge = slerp_config(family, 0.5)
    space = [SearchSpace("parameters.t", 0, 1, groups=3), SearchSpace("models[1].parameters.weight", 0, 1),
             SearchSpace("parameters.t", 0, 1, filter="self_attn")]
    config = apply_params(merge, space, {"parameters.t#0": 0.1, "parameters.t#1": 0.2, "parameters.t#2": 0.3,
                                         "models[1].parameters.weight": 0.4, "parameters.t[self_attn]": 0.9})
    assert config["parameters"]["t"] == [{"filter": "self_attn", "value": 0.9}, {"value": [0.1, 0.2, 0.3]}]
    assert config["models"][1]["parameters"] == {"weight": 0.4} and merge["parameters"] == {"t": 0.5}


def test_pareto_front_keeps_task_trade_offs():
    trials = [Trial(0, {}, {"a": 0.9, "b": 0.1}, 0.5), Trial(1, {}, {"a": 0.1, "b": 0.9}, 0.5),
              Trial(2, {}, {"a": 0.5, "b": 0.5}, 0.5), Trial(3, {}, {"a": 0.4, "b": 0.4}, 0.4),
              Trial(4, {}, {"a": 0.9, "b": 0.1}, 0.5)]
    assert sorted(t.trial for t in pareto_front(trials, ["a", "b"])) == [0, 1, 2]  # 3 is beaten, 4 repeats 0
    dense = [Trial(0, {}, {"a": 0.5}, 0.5, mean_density=0.9), Trial(1, {}, {"a": 0.5}, 0.5, mean_density=0.3)]
    assert [t.trial for t in pareto_front(dense, ["a"])] == [1]  # same accuracy, sparser wins


@pytest.mark.parametrize("change,pattern", [
    ({"search": []}, "at least one"),
    ({"search": [{"path": "parameters.t", "low": 1, "high": 0}]}, "low < high"),
    ({"search": [{"path": "models[7].x", "low": 0, "high": 1}]}, "does not exist"),
    ({"sampler": "grid"}, "tpe or random"),
    ({"extra": 1}, "unknown key"),
    ({"objective": {"tasks": ["arithmetic"], "reference": {"arithmetic": 0}}}, r"reference\.arithmetic: .*\(0, 1\]"),
    ({"objective": {"tasks": ["arithmetic"], "reference": {"reverse": 0.5}}}, "one accuracy per objective task"),
    ({"objective": {"tasks": ["arithmetic"], "refrence": {}}}, "objective: unknown key"),
])
def test_bad_search_files_name_the_problem(family, tmp_path, change, pattern):
    with pytest.raises(QwenlabError, match=pattern):
        load_search_config(search_file(family, tmp_path, **change))


def test_merge_search_cli_writes_results_and_best(family, tmp_path, capsys):
    out, best = tmp_path / "search-out", tmp_path / "best"
    assert main(["merge-search", str(search_file(family, tmp_path)), "--trials", "3", "--out", str(out),
                 "--write-best", str(best)]) == 0
    printed = capsys.readouterr().out
    assert "Pareto front" in printed and "best merge written" in printed
    result = json.loads((out / "merge_search.json").read_text())
    assert len(result["trials"]) == 3 and result["pareto"] and result["sampler"].startswith("optuna")
    t = result["best"]["config"]["parameters"]["t"]
    assert isinstance(t, list) and len(t) == 2 and all(0 <= v <= 1 for v in t)  # a 2-point gradient
    assert yaml.safe_load((out / "best.yaml").read_text()) == result["best"]["config"]
    assert (best / "lineage.json").is_file()
    from qwenlab.variants.results import latest

    assert latest(best, "accuracy")["arithmetic"].values["n"] == 2  # re-measured on the written folder


def test_a_reference_makes_the_objective_the_worst_kept_share(family, tmp_path):
    from qwenlab.merge.search import run_search, score_trial

    assert score_trial({"a": 0.45, "b": 0.2}, {"a": 0.5, "b": 0.4}) == pytest.approx(0.5)  # b keeps half
    assert score_trial({"a": 0.45, "b": 0.2}, None) == pytest.approx(0.325)  # no reference: the mean
    path = search_file(family, tmp_path, objective={"tasks": ["arithmetic", "reverse"], "n": 2,
                                                    "reference": {"arithmetic": 0.5, "reverse": 0.25}})
    result = run_search(load_search_config(path), progress=False)
    for trial in result["trials"]:
        shares = [trial["tasks"]["arithmetic"] / 0.5, trial["tasks"]["reverse"] / 0.25]
        assert trial["objective"] == pytest.approx(min(shares))
        assert trial["mean_accuracy"] == pytest.approx(sum(trial["tasks"].values()) / 2)
    assert "worst kept share" in result["objective"] and result["reference"] == {"arithmetic": 0.5, "reverse": 0.25}
