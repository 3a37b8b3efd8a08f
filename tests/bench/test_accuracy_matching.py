"""Accuracy figures that cannot mislead: intervals, paired tests, settings matched across variants,
and a smaller-n evaluation that never replaces a larger one."""

import math

import pytest

from qwenlab.report.compare import build_comparison
from qwenlab.stats import paired_comparison, wilson_interval
from qwenlab.variants.listing import format_listing, list_variants
from qwenlab.variants.results import accuracy_figures, latest, record_measurement


def record(folder, task: str, rewards: list[int], *, difficulty=1, seed=0, keep_rewards=True):
    values = {"accuracy": sum(rewards) / len(rewards), "n": len(rewards), "seed": seed, "difficulty": difficulty}
    if keep_rewards:
        values["rewards"] = rewards
    record_measurement(folder, "accuracy", {task: values}, setup={"dtype": "fp32", "seed": seed,
                                                                  "difficulty": difficulty})


def test_wilson_interval_matches_its_closed_form():
    low, high = wilson_interval(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)
    low, high = wilson_interval(0, 10)  # honest at 0/n: not the degenerate [0, 0] of mean +- 1.96 SE
    assert low == 0 and high == pytest.approx(3.8415 / 13.8415, abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(10, 10)[0] < 0.75


def test_paired_comparison_is_mcnemars_exact_test_on_binary_rewards():
    # 10 prompts where b alone is right, 2 where a alone is right, 8 where both agree.
    a = [0] * 10 + [1] * 2 + [1] * 4 + [0] * 4
    b = [1] * 10 + [0] * 2 + [1] * 4 + [0] * 4
    test = paired_comparison(a, b)
    assert (test.b_better, test.a_better, test.n) == (10, 2, 20)
    assert test.p_value == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert test.difference == pytest.approx(0.4) and test.low < 0.4 < test.high
    assert test.significant()
    assert not paired_comparison(a[:3] + [1], b[:3] + [0]).significant()  # 3 vs 1 discordant: p = 0.625
    with pytest.raises(ValueError, match="same instances"):
        paired_comparison([1, 0], [1])


def test_a_smaller_n_evaluation_never_replaces_a_larger_one(fresh_family):
    folder = fresh_family / "base"
    record(folder, "arithmetic", [1, 0] * 200)  # n=400
    record(folder, "arithmetic", [1] * 50)  # newer, n=50
    assert latest(folder, "accuracy")["arithmetic"].values["n"] == 400
    assert [f.values["n"] for f in accuracy_figures(folder)["arithmetic"]] == [400, 50]  # both kept
    record(folder, "arithmetic", [0, 1] * 200)  # newer at equal n: the newest wins
    assert latest(folder, "accuracy")["arithmetic"].values["rewards"][0] == 0
    rows = [r for r in list_variants([folder])]
    text = format_listing(rows)
    assert "n=400" in text and "+1 other setting" in text
    assert {s["n"] for s in rows[0]["accuracy_settings"]["arithmetic"]} == {400, 50}


def test_compare_uses_only_figures_whose_settings_match(fresh_family):
    base, other = fresh_family / "base", fresh_family / "other"
    # The user once evaluated base at difficulty 3 (newer, larger n); the run measured both at difficulty 1.
    record(base, "arithmetic", [1] * 30 + [0] * 70, difficulty=1)
    record(other, "arithmetic", [1] * 80 + [0] * 20, difficulty=1)
    record(base, "arithmetic", [0] * 400, difficulty=3)
    comparison = build_comparison([base, other])
    row = {r["name"]: r for r in comparison.rows}
    assert row["base"]["tasks"]["arithmetic"] == pytest.approx(0.30)  # not the difficulty-3 figure
    assert row["base"]["task_setting"]["arithmetic"] == [1, 0]
    low, high = row["other"]["task_interval"]["arithmetic"]
    assert low < 0.80 < high and (low, high) == pytest.approx(wilson_interval(80, 100), abs=1e-4)
    # An explicit setting (a recipe's) overrides the most-shared rule.
    only = build_comparison([base, other], accuracy_where={"difficulty": 3, "seed": 0})
    only_rows = {r["name"]: r for r in only.rows}
    assert only_rows["base"]["tasks"]["arithmetic"] == 0 and "arithmetic" not in only_rows["other"]["tasks"]
    assert any("other" in n and "other settings" in n for n in only.notes)


def test_a_larger_n_figure_is_cut_to_the_shared_prefix(fresh_family):
    base, other = fresh_family / "base", fresh_family / "other"
    record(base, "reverse", [1] * 100 + [0] * 300)  # 0.25 on 400; 1.0 on its first 100
    record(other, "reverse", [0] * 50 + [1] * 50)
    row = {r["name"]: r for r in build_comparison([base, other]).rows}
    assert row["base"]["task_n"]["reverse"] == 100 and row["base"]["tasks"]["reverse"] == 1.0
    assert row["other"]["tasks"]["reverse"] == 0.5


def test_the_verdict_ships_the_best_and_backs_each_claim_with_a_paired_test(fresh_family):
    base, other, lora = fresh_family / "base", fresh_family / "other", fresh_family / "lora"
    prompts = 200
    record(base, "arithmetic", [1] * 60 + [0] * (prompts - 60))
    record(other, "arithmetic", [1] * 120 + [0] * (prompts - 120))  # clearly better than base on the same prompts
    record(lora, "arithmetic", [1] * 118 + [0] * (prompts - 118))  # within noise of other
    text = build_comparison([base, other, lora]).recommendation
    assert text.startswith("**Ship `other`**") and "0.600" in text
    assert "better than `base`" in text and "p < 0.05" in text
    assert "Not distinguishable from it on these prompts: `lora`" in text
    # Old records without per-instance rewards are said to be untested, not silently compared.
    record(base, "arithmetic", [1] * 60 + [0] * (prompts - 60), keep_rewards=False)
    assert "Not tested against it" in build_comparison([base, other]).recommendation
    assert not math.isnan(build_comparison([base, other]).rows[0]["mean_accuracy"])


def test_compare_measure_remeasures_a_figure_recorded_without_per_instance_rewards(fresh_family):
    """An old record (no rewards) cannot back a paired claim: --measure measures it again, so the verdict
    does not depend on what an older qwenlab left in the cache."""
    from qwenlab.report.measure import measure_missing
    from qwenlab.variants.results import rewards_of

    base = fresh_family / "base"
    record(base, "arithmetic", [1, 0, 0, 0], difficulty=1, keep_rewards=False)
    measured = measure_missing({"base": str(base)}, ["arithmetic"], n=4, seed=0, difficulty=1)
    assert measured == ["base: accuracy on arithmetic"]
    newest = accuracy_figures(base)["arithmetic"][0]
    assert rewards_of(newest) is not None and len(rewards_of(newest)) == 4
    assert measure_missing({"base": str(base)}, ["arithmetic"], n=4, seed=0, difficulty=1) == []
