"""Recipe stages `compare` and `card`: every variant in report.md, measured where missing, a card for each."""

import json

from huggingface_hub import ModelCard

from qwenlab.variants.results import latest, record_measurement
from qwenlab.recipe import run_recipe


def test_compare_and_card_stages(fresh_family, tmp_path):
    root = fresh_family
    record_measurement(root / "slerp-0.3", "speed", {"64": {"ttft_s": 0.004, "decode_tokens_per_s": 42.0}})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
name: measure
models: {{base: {root / 'base'}, merged: {root / 'slerp-0.3'}, adapter: {root / 'lora'}}}
stages:
  - compare: {{tasks: [arithmetic], n: 2}}
  - compare: {{models: [base, merged], tasks: [arithmetic], n: 2, label: compare-again}}
  - card: {{license: apache-2.0}}
""")
    run = tmp_path / "run"
    run_recipe(recipe, run)
    figures = json.loads((run / "figures.json").read_text())
    first, second = figures["01-compare"], figures["02-compare-again"]
    assert sorted(first["measured"]) == ["adapter: accuracy on arithmetic", "base: accuracy on arithmetic",
                                         "merged: accuracy on arithmetic"]
    assert second["measured"] == []  # recorded figures at the same n and seed are reused
    assert latest(root / "lora", "accuracy")["arithmetic"].values["n"] == 2
    assert [r["name"] for r in first["rows"]] == ["base", "merged", "adapter"]
    report = (run / "report.md").read_text()
    assert "## All variants: quality, speed, size" in report and "Ship `" in report
    assert "![Accuracy per task](compare/accuracy.png)" in report and (run / "compare" / "compare.html").is_file()
    assert set(json.loads((run / "variants.json").read_text())) == {"base", "merged", "adapter"}
    cards = figures["03-card"]["cards"]
    assert set(cards) == {"base", "merged", "adapter"} and all(p.startswith("cards/") for p in cards.values())
    card = ModelCard.load(run / cards["merged"])
    assert card.data.license == "apache-2.0" and "## Choosing which model to use" in card.text
    assert "| - | 64 | 4.0 ms | 42.0 |" in card.text and "## Model cards" in report
