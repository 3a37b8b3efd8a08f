"""GSM8K-style files: reference parsing, answer extraction, scoring, and `qwenlab eval --gsm8k`."""

import importlib
import json
from decimal import Decimal
from pathlib import Path

import pytest

from qwenlab.eval import gsm8k
from qwenlab.eval.gsm8k import evaluate_gsm8k, extract_answer, read_gsm8k
from qwenlab.cli import main
from qwenlab.errors import QwenlabError
from qwenlab.model.generate import Completion

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("text,expected", [
    ("3 + 4 = 7 so he has 7 apples.", "7"), ("#### 1,000", "1000"), ("costs $5.00 in total", "5.00"),
    ("it drops to -3", "-3"), ("first 12 #### 13 then 14", "13"), ("no digits here", None),
    ("The answer is 18.", "18"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == (Decimal(expected) if expected else None)


def test_read_gsm8k_parses_final_answers():
    records = read_gsm8k(DATA / "gsm8k_tiny.jsonl")
    assert [r["expected"] for r in records] == [7, 24, 1000]
    assert len(read_gsm8k(DATA / "gsm8k_tiny.jsonl", limit=2)) == 2


@pytest.mark.parametrize("line,pattern", [('{"question": "q"}', "string fields"), ('{"question": "q", "answer": "4"}',
                                                                                    "no '#### N'"),
                                          ("nope", "invalid JSON")])
def test_bad_records_name_the_line(tmp_path, line, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(QwenlabError, match=f"bad.jsonl:1: .*{pattern}"):
        read_gsm8k(path)


class PlainTokenizer:
    chat_template = None


def test_scoring_and_fewshot(monkeypatch):
    seen_prompts = []

    def fake_generate(model, tokenizer, prompts, config):
        seen_prompts.extend(prompts)
        return [Completion("So 2 * 12 = 24.\n#### 24" if "box" in p.rsplit("Question:", 1)[1] else "It is 999", [], 0,
                           "stop") for p in prompts]

    monkeypatch.setattr(importlib.import_module("qwenlab.model.generate"), "generate", fake_generate)
    records = read_gsm8k(DATA / "gsm8k_tiny.jsonl")
    result = evaluate_gsm8k(None, PlainTokenizer(), records, fewshot=1, progress=False)
    assert (result.n, result.correct, result.accuracy) == (2, 1, 0.5)  # the first record is the example
    assert all(p.startswith("Question: Tom has 3 apples") and p.endswith("\nAnswer:") for p in seen_prompts)
    assert result.examples[0]["extracted"] == "24" and result.examples[1]["correct"] is False
    with pytest.raises(QwenlabError, match="leaves no record"):
        evaluate_gsm8k(None, PlainTokenizer(), records, fewshot=3)
    assert gsm8k.PLAIN_STOP[0] == "\n\nQuestion:"


def test_eval_cli_gsm8k_records_accuracy(fresh_family, capsys):
    from qwenlab.variants.results import latest

    folder = fresh_family / "base"
    assert main(["eval", str(folder), "--gsm8k", str(DATA / "gsm8k_tiny.jsonl"), "--limit", "2",
                 "--max-new-tokens", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gsm8k"]["n"] == 2 and "tasks" not in report  # a file evaluation alone runs no tasks
    recorded = latest(folder, "accuracy")["gsm8k:gsm8k_tiny"]
    assert recorded.values["n"] == 2 and recorded.values["accuracy"] == report["gsm8k"]["accuracy"]
