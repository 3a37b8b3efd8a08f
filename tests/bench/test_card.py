"""`qwenlab card`: a Hugging Face model card that huggingface_hub parses, with measured figures only."""

import re

from huggingface_hub import ModelCard

from qwenlab.report.card import NOT_MEASURED, build_card, validate_card, write_card
from qwenlab.variants.results import record_measurement
from qwenlab.cli import main


def test_card_of_a_measured_merge(fresh_family):
    folder = fresh_family / "slerp-0.3"
    record_measurement(folder, "accuracy", {"arithmetic": {"accuracy": 0.75, "n": 40, "seed": 0},
                                            "reverse": {"accuracy": 0.5, "n": 40, "seed": 0}}, command="qwenlab eval x")
    record_measurement(folder, "speed", {"128": {"ttft_s": 0.0123, "decode_tokens_per_s": 77.7,
                                                 "peak_rss_bytes": 300 << 20}}, setup={"threads": 2},
                       command="qwenlab bench x")
    record_measurement(folder, "speed", {"128": {"ttft_s": 0.0061, "decode_tokens_per_s": 99.0}},
                       setup={"dtype": "bf16"})
    text = build_card(folder, base_model="Qwen/Qwen2.5-0.5B", license="apache-2.0")
    card = validate_card(text)
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B" and card.data.base_model_relation == "merge"
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert {"qwenlab", "merge", "slerp"} <= set(card.data.tags)
    assert {(r.dataset_name, r.metric_value) for r in card.data.eval_results} == {("arithmetic", 0.75),
                                                                                 ("reverse", 0.5)}
    body = card.text
    for heading in ("## Lineage", "## Architecture", "## Hyperparameters", "## Files", "## Benchmarks",
                    "## Limitations"):
        assert heading in body
    assert "merge_method: slerp" in body and "| 1 | `slerp-0.3` | merge | slerp |" in body
    assert "| - | 128 | 12.3 ms | 77.7 | 300.00 MiB |" in body and "`qwenlab bench x`" in body
    assert "| bf16 | 128 | 6.1 ms | 99.0 | not measured |" in body  # one row per dtype it was run as
    assert "├── model.safetensors" in body and "Mean over 2 task(s): 0.625." in body
    assert f"Perplexity: {NOT_MEASURED}." in body


def test_unmeasured_adapter_card_says_not_measured(family, tmp_path):
    path = write_card(family / "lora", tmp_path)  # a folder: README.md inside it
    card = ModelCard.load(path)
    assert path.name == "README.md" and card.data.library_name == "peft" and card.data.eval_results is None
    assert card.data.base_model is None  # a local base has no Hub id: none is invented
    body = card.text
    assert f"TTFT and tokens/s: {NOT_MEASURED}" in body and f"Task accuracy: {NOT_MEASURED}" in body
    assert f"peak RSS while generating: {NOT_MEASURED}" in body
    assert not re.search(r"tokens/s \|", body) and "The base model's architecture" in body
    assert '"r": 2' in body and "No task accuracy was measured" in body


def test_card_cli_with_variants(fresh_family, capsys):
    record_measurement(fresh_family / "base", "accuracy", {"arithmetic": {"accuracy": 0.5, "n": 10}})
    record_measurement(fresh_family / "slerp-0.7", "accuracy", {"arithmetic": {"accuracy": 0.6, "n": 10}})
    assert main(["card", str(fresh_family / "slerp-0.7"), "--variants", str(fresh_family / "base"),
                 str(fresh_family / "slerp-0.7")]) == 0
    assert "wrote" in capsys.readouterr().out
    card = ModelCard.load(fresh_family / "slerp-0.7" / "README.md")
    assert "## Variants" in card.text and "## Choosing which model to use" in card.text and "Ship `" in card.text
    assert main(["card", str(fresh_family / "base"), "--print"]) == 0
    assert capsys.readouterr().out.startswith("---\n")
