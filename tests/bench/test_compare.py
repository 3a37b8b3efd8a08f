"""`qwenlab compare`: one table, plots (Markdown and self-contained HTML), sweeps and the recommendation."""

import json
import re

import pytest

from qwenlab.report.compare import build_comparison, recommend, write_comparison
from qwenlab.variants.results import record_measurement
from qwenlab.cli import main


def measure(folder, accuracy: dict, tokens_per_s: float | None, n: int = 100):
    record_measurement(folder, "accuracy", {t: {"accuracy": a, "n": n, "seed": 0} for t, a in accuracy.items()})
    if tokens_per_s is not None:
        record_measurement(folder, "speed", {str(ctx): {"ttft_s": 0.001 * ctx, "decode_tokens_per_s": tokens_per_s,
                                                        "peak_rss_bytes": 50 << 20} for ctx in (64, 128)})


def test_comparison_table_plots_sweep_and_recommendation(fresh_family, tmp_path):
    root = fresh_family
    measure(root / "base", {"arithmetic": 0.50, "reverse": 0.40}, 100.0)
    measure(root / "slerp-0.3", {"arithmetic": 0.90, "reverse": 0.80}, 60.0)
    measure(root / "slerp-0.7", {"arithmetic": 0.88, "reverse": 0.80}, 90.0)  # close, faster; no rewards to pair
    measure(root / "lora", {"arithmetic": 0.70}, None, n=20)
    comparison, files = write_comparison([root], tmp_path / "out")
    assert comparison.tasks == ["arithmetic", "reverse"] and comparison.contexts == [64, 128]
    assert [s["parameter"] for s in comparison.sweeps] == ["t"]  # the two SLERPs differ in t only
    assert [p[0] for p in comparison.sweeps[0]["points"]] == [0.3, 0.7]
    # The best mean over the shared task ships; records without per-instance rewards are not claimed against.
    assert comparison.recommendation.startswith("**Ship `slerp-0.3`**") and "60.0 tokens/s" in comparison.recommendation
    assert "Not tested against it" in comparison.recommendation and "`slerp-0.7` (0.880)" in comparison.recommendation
    assert any("different numbers of instances" in n for n in comparison.notes)
    assert any("speed not measured for: " in n and "lora" in n for n in comparison.notes)
    markdown = files["markdown"].read_text()
    assert "| slerp-0.3 | merge | slerp: base, other |" in markdown and "![Accuracy per task](accuracy.png)" in markdown
    assert {"accuracy", "speed_vs_size", "ttft", "sweep_0"} <= set(files) and files["accuracy"].stat().st_size > 1000
    page = files["html"].read_text()
    assert page.count("data:image/png;base64,") == 4 and not re.search(r"src='[^d]", page)  # self-contained
    rows = json.loads(files["json"].read_text())["rows"]
    assert {r["name"]: r["mean_accuracy"] for r in rows}["slerp-0.3"] == pytest.approx(0.85)


def test_recommendation_without_speed_or_accuracy(fresh_family):
    measure(fresh_family / "base", {"arithmetic": 0.5}, None)
    measure(fresh_family / "other", {"arithmetic": 0.5}, None)
    comparison = build_comparison([fresh_family / "base", fresh_family / "other", fresh_family / "lora"])
    assert comparison.recommendation.startswith("**Ship `") and "tokens/s" not in comparison.recommendation
    assert recommend([{**r, "tasks": {}} for r in comparison.rows], []).startswith("No recommendation")


def test_merge_search_results_are_compared(fresh_family, tmp_path, capsys):
    search = {"method": "slerp", "objective": "mean accuracy", "sampler": "optuna random", "tasks": ["arithmetic"],
              "trials": [{"trial": i, "params": {"parameters.t": t}, "tasks": {"arithmetic": a}, "objective": a}
                         for i, (t, a) in enumerate([(0.1, 0.2), (0.5, 0.6), (0.9, 0.4)])],
              "best": {"trial": 1, "params": {"parameters.t": 0.5}, "objective": 0.6},
              "pareto": [{"trial": 1, "params": {"parameters.t": 0.5}, "objectives": {"acc:arithmetic": 0.6}}]}
    folder = tmp_path / "search"
    folder.mkdir()
    (folder / "merge_search.json").write_text(json.dumps(search))
    assert main(["compare", str(fresh_family / "base"), str(folder), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "No recommendation" in out and "wrote" in out
    markdown = (tmp_path / "cmp" / "compare.md").read_text()
    assert "## Merge search 1: slerp" in markdown and "| 1 | 0.500 | 0.600 |" in markdown
    assert (tmp_path / "cmp" / "search_0.png").is_file()


def test_accuracy_plots_tell_not_measured_from_a_measured_zero():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qwenlab.report.compare import mark_unmeasured_and_zero

    fig, ax = plt.subplots()
    mark_unmeasured_and_zero(ax, [0.0, 1.0, 2.0], [None, 0.0, 0.5])
    labels = [(round(t.get_position()[0], 1), t.get_text()) for t in ax.texts]
    plt.close(fig)
    assert labels == [(0.0, "not measured"), (1.0, "0")]


def test_compare_measure_fills_in_what_is_missing_then_reuses_it(fresh_family, tmp_path, capsys):
    from qwenlab.cli import main
    from qwenlab.variants.results import latest

    args = ["compare", str(fresh_family / "base"), str(fresh_family / "other"), "--out", str(tmp_path / "c"),
            "--measure", "--tasks", "reverse", "--n", "3"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("measured ") == 2 and "accuracy on reverse" in err
    for name in ("base", "other"):
        assert latest(fresh_family / name, "accuracy")["reverse"].values["n"] == 3
    assert main([*args[:4], str(tmp_path / "c2"), *args[5:]]) == 0
    assert "measured " not in capsys.readouterr().err  # recorded figures are reused, nothing re-measured
