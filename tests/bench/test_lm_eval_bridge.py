"""The lm_eval model "qwenlab": loglikelihoods equal lm_eval's own HF model on the same weights; local tasks run."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is imported: set it first

import pytest

from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

import qwenlab.eval.lm_eval_bridge  # noqa: F401  registers "qwenlab"
from qwenlab.eval.lm_eval_bridge import QwenlabLM, main_metric, run_lm_eval
from qwenlab.cli import main

DATA = Path(__file__).parent / "data" / "lm_eval"
PAIRS = [("What is 12 + 7?", " 19"), ("Reverse the word: apple", " elppa"), ("", "hello world"),
         ("hello ", "world"), ("What is 12 + 7? The answer is", " 19. hello world hello world")]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    for template in DATA.glob("*.yaml.template"):
        (folder / template.name.removesuffix(".template")).write_text(template.read_text().replace("DATA", str(DATA)))
    return folder


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def hf_lm(family):
    return get_model("hf")(pretrained=str(family / "base"), dtype="float32", batch_size=2, device="cpu")


def test_registered_beside_lm_eval_models():
    assert get_model("qwenlab") is QwenlabLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours did not hide lm_eval's own


def test_loglikelihoods_match_hf(family, hf_lm):
    ours = get_model("qwenlab").create_from_arg_string(f"pretrained={family / 'base'},dtype=fp32,batch_size=3")
    assert ours.prefix_token_id == hf_lm.prefix_token_id and ours.max_length == hf_lm.max_length
    mine, theirs = ours.loglikelihood(requests("loglikelihood", PAIRS)), hf_lm.loglikelihood(
        requests("loglikelihood", PAIRS))
    for (a, greedy_a), (b, greedy_b) in zip(mine, theirs):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    texts = [("hello world " * 30,), ("What is 12 + 7?",)]  # the first spans several rolling windows
    hf_lm._max_length = ours._max_length = 32
    try:
        rolling = ours.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
        assert rolling == pytest.approx(hf_lm.loglikelihood_rolling(requests("loglikelihood_rolling", texts)), abs=1e-4)
        truncated = [("hello world " * 20, " world")]  # context longer than max_length: left truncation
        assert ours.loglikelihood(requests("loglikelihood", truncated))[0][0] == pytest.approx(
            hf_lm.loglikelihood(requests("loglikelihood", truncated))[0][0], abs=1e-4)
    finally:
        hf_lm._max_length = ours._max_length = None
    greedy = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    gen = requests("generate_until", [(p, greedy) for p, _ in PAIRS[:2]])
    assert ours.generate_until(gen) == hf_lm.generate_until(gen)


def test_adapter_loglikelihoods_match_hf_with_peft(family):
    ours = QwenlabLM(pretrained=str(family / "base"), adapter=str(family / "lora"))
    hf = get_model("hf")(pretrained=str(family / "base"), peft=str(family / "lora"), dtype="float32", batch_size=2,
                         device="cpu")
    base = QwenlabLM(pretrained=str(family / "base"))
    mine = ours.loglikelihood(requests("loglikelihood", PAIRS))
    theirs = hf.loglikelihood(requests("loglikelihood", PAIRS))
    assert [a for a, _ in mine] == pytest.approx([b for b, _ in theirs], abs=1e-4)
    assert [a for a, _ in mine] != pytest.approx([a for a, _ in base.loglikelihood(requests("loglikelihood", PAIRS))])


def test_local_yaml_tasks_through_simple_evaluate(family, task_dir):
    output = run_lm_eval(str(family / "base"), ["qwenlab_tiny_mc", "qwenlab_tiny_gen", "qwenlab_tiny_ppl"],
                         include_path=str(task_dir), only_include_path=True, batch_size=4)
    results = output["results"]
    assert 0 <= results["qwenlab_tiny_mc"]["acc,none"] <= 1
    assert 0 <= results["qwenlab_tiny_gen"]["exact_match,none"] <= 1
    assert results["qwenlab_tiny_ppl"]["word_perplexity,none"] > 1
    assert main_metric(results["qwenlab_tiny_mc"]) == ("acc,none", results["qwenlab_tiny_mc"]["acc,none"])


def test_eval_cli_lm_eval_records(fresh_family, task_dir, capsys):
    from qwenlab.variants.results import latest

    folder = fresh_family / "lora"  # an adapter folder: evaluated over its base, recorded in the adapter
    assert main(["eval", str(folder), "--lm-eval", "qwenlab_tiny_mc,qwenlab_tiny_ppl", "--include-path",
                 str(task_dir), "--only-include-path", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["lm_eval"]) == {"qwenlab_tiny_mc", "qwenlab_tiny_ppl"}
    assert latest(folder, "accuracy")["lm_eval:qwenlab_tiny_mc"].values["metric"] == "acc,none"
    assert latest(folder, "perplexity")["lm_eval:qwenlab_tiny_ppl"].values["perplexity"] > 1
    assert main(["eval", str(folder), "--lm-eval", "no_such_task", "--include-path", str(task_dir),
                 "--only-include-path"]) == 2
