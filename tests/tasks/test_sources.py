"""Task sources: reasoning-gym items rebuilt from the index, its scoring, JSONL with math-verify or a user's
verifier, mixtures, identities, the one spelling and its one-line errors, and `qwenlab grpo` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from qwenlab.errors import QwenlabError
from qwenlab.tasks import generate, get_task, parse_task_list, sample_instances, score_instance

CHAIN_SUM = "min_terms: 2\nmax_terms: 2\nmax_digits: 1\n"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "chain_sum.yaml").write_text(CHAIN_SUM)
    (tmp_path / "data.jsonl").write_text(
        json.dumps({"question": "Tom has 3 apples and buys 4 more. How many now?", "answer": "3 + 4 = 7\n#### 7"})
        + "\n" + json.dumps({"question": "What is 1000 + 234?", "answer": "#### 1,234"}) + "\n")
    (tmp_path / "verifier.py").write_text(
        "def exact(completion, item):\n"
        "    if 'boom' in completion:\n"
        "        raise ValueError('the verifier broke')\n"
        "    return 1.0 if completion.strip() == item['answer'].split('####')[-1].strip() else 0.0\n")
    (tmp_path / "mix.yaml").write_text(
        "tasks:\n"
        "  - {task: 'reasoning_gym:chain_sum@chain_sum.yaml', weight: 2}\n"
        "  - {task: 'reasoning_gym:count_bits', config: {max_n: 64}}\n"
        "  - arithmetic\n")
    return tmp_path


def test_reasoning_gym_items_rebuilt_from_the_index_are_identical_in_another_process(files):
    """Two peers: this process and a fresh one (another hash seed) rebuild the same items from the index."""
    spelling = f"reasoning_gym:chain_sum@{files / 'chain_sum.yaml'}"
    seeds = [100_000_000 + 7 * i for i in range(20)]
    here = [(i.prompt, i.expected, repr(i.item)) for i in (generate(spelling, s) for s in seeds)]
    code = ("import sys, json; from qwenlab.tasks import generate\n"
            f"print(json.dumps([(i.prompt, i.expected, repr(i.item)) for i in (generate({spelling!r}, s) for s in {seeds})]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "3", "PATH": ""})
    assert [tuple(x) for x in json.loads(out.stdout)] == here
    assert len({p for p, _, _ in here}) > 10  # and the indices do give different items


def test_reasoning_gym_scoring_wrong_zero_right_with_whitespace_one(files):
    spelling = f"reasoning_gym:chain_sum@{files / 'chain_sum.yaml'}"
    for seed in range(100_000_000, 100_000_020):
        instance = generate(spelling, seed)
        assert score_instance(instance, f"<answer>  {instance.expected} \n</answer>") == 1.0
        wrong = str(int(instance.expected) + 1)
        assert instance.expected not in wrong  # (an answer holding the oracle earns reasoning-gym's partial credit)
        assert score_instance(instance, f"so <answer>{wrong}</answer>") == 0.0
        assert score_instance(instance, instance.expected) == 0.0  # no <answer> block
        assert score_instance(instance, get_task(spelling).reference_completion(instance)) == 1.0


def test_jsonl_with_gsm8k_answers_is_scored_by_math_verify_on_any_thread(files):
    spelling = f"jsonl:{files / 'data.jsonl'}"
    instance = generate(spelling, 1)
    assert instance.prompt == "What is 1000 + 234?" and instance.expected == "1234"
    assert score_instance(instance, "The answer is 1,234.") == 1.0
    assert score_instance(instance, "<answer>1234</answer>") == 1.0
    assert score_instance(instance, "It is 1235.") == 0.0
    # off the main thread math-verify's signal timeouts cannot run: it answers the same through its child
    results = []
    worker = threading.Thread(target=lambda: results.extend(
        [score_instance(instance, "so 1234"), score_instance(instance, "so 1243")]))
    worker.start()
    worker.join(60)
    assert results == [1.0, 0.0]
    assert sorted(i.seed for i in sample_instances(spelling, 10, seed=0)) == [0, 1]  # every row once


def test_custom_verifier_gets_the_row_and_a_raising_one_scores_zero(files, capsys):
    spelling = f"jsonl:{files / 'data.jsonl'}@{files / 'verifier.py'}:exact"
    instance = generate(spelling, 0)
    assert score_instance(instance, " 7 ") == 1.0 and score_instance(instance, "8") == 0.0
    assert score_instance(instance, "boom") == 0.0
    assert get_task(spelling).errors["ValueError"] == 1
    assert "the verifier broke" in capsys.readouterr().err


def test_a_hanging_verifier_scores_zero_within_its_budget_with_one_line_and_the_next_call_works(files, capsys):
    (files / "hangs.py").write_text(
        "import time\n"
        "def reward(completion, item):\n"
        "    if 'hang' in completion:\n"
        "        while True:\n"
        "            time.sleep(3600)\n"
        "    return 1.0 if completion.strip() == '7' else 0.0\n")
    spelling = f"jsonl:{files / 'data.jsonl'}@{files / 'hangs.py'}:reward"
    source = get_task(spelling)
    source.verifier.budget_s = 1.0
    instance = generate(spelling, 0)
    assert score_instance(instance, "7") == 1.0  # (this first call also starts the verifier's process)
    started, result = time.monotonic(), []
    call = threading.Thread(target=lambda: result.append(score_instance(instance, "hang")), daemon=True)
    call.start()
    call.join(10)  # without a budget the call would never return: fail, do not hang the suite
    assert not call.is_alive() and result == [0.0]
    assert time.monotonic() - started < 4.0
    assert source.errors["timeout"] == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "hangs.py:reward" in line]
    assert len(lines) == 1 and "ran past its 1 s budget" in lines[0] and "scores 0" in lines[0]
    assert score_instance(instance, "7") == 1.0 and score_instance(instance, "8") == 0.0  # a new process answers
    source.verifier.stop()


def test_mixture_draws_components_by_weight_and_scores_each_with_its_own_verifier(files):
    spelling = f"mix:{files / 'mix.yaml'}"
    source = get_task(spelling)
    instances = [generate(spelling, 100_000_000 + i) for i in range(300)]
    components = [i.item["component"] for i in instances]
    chain = sum(c.startswith("reasoning_gym:chain_sum") for c in components)
    assert 110 < chain < 190 and len(set(components)) == 3  # weights 2:1:1
    for instance in instances[:30]:
        assert score_instance(instance, source.reference_completion(instance)) == 1.0
        assert instance == generate(spelling, instance.seed)


def test_identity_follows_name_config_and_data_not_the_path(files, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("copy")
    (elsewhere / "data.jsonl").write_bytes((files / "data.jsonl").read_bytes())
    assert get_task(f"jsonl:{files / 'data.jsonl'}").digest == get_task(f"jsonl:{elsewhere / 'data.jsonl'}").digest
    changed = tmp_path_factory.mktemp("changed")
    (changed / "data.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    assert get_task(f"jsonl:{changed / 'data.jsonl'}").digest != get_task(f"jsonl:{files / 'data.jsonl'}").digest
    assert get_task("reasoning_gym:chain_sum").digest != get_task(f"reasoning_gym:chain_sum@{files / 'chain_sum.yaml'}").digest


@pytest.mark.parametrize("spelling, message", [
    ("reasoning_gym:chain_summ", "unknown dataset 'chain_summ'; did you mean chain_sum"),
    ("reasoning_gym:chain_sum@missing.yaml", "missing.yaml: no such reasoning-gym config YAML"),
    ("reasoning_gym:chain_sum@bad.yaml", "bad.yaml: invalid YAML"),
    ("reasoning_gym:chain_sum@typo.yaml", "unknown config key(s) max_digitz"),
    ("jsonl:missing.jsonl", "missing.jsonl: no such JSONL file"),
    ("jsonl:data.jsonl@verifier.py:nothing", "verifier.py: no function 'nothing'"),
    ("jsonl:data.jsonl@verifier.py", "the verifier must be spelled FILE.py:FUNCTION"),
    ("mix:missing.yaml", "missing.yaml: no such mixture spec YAML"),
    ("telepathy:x", "unknown kind 'telepathy'"),
])
def test_bad_spellings_are_one_line_errors(files, monkeypatch, spelling, message):
    monkeypatch.chdir(files)
    (files / "bad.yaml").write_text("a: [1,\n")
    (files / "typo.yaml").write_text("max_digitz: 2\n")
    with pytest.raises(QwenlabError) as error:
        parse_task_list(f"arithmetic,{spelling}")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_jsonl_task_and_custom_verifier_through_qwenlab_grpo_on_nano(files, tmp_path):
    """`qwenlab grpo` end to end on nano with a JSONL task and a user's verifier: rewards come from the
    verifier (it counts its calls in a file), the run finishes and writes its adapter."""
    (files / "counting.py").write_text(
        "from pathlib import Path\n"
        f"LOG = Path({str(tmp_path / 'calls.txt')!r})\n"
        "def reward(completion, item):\n"
        "    with open(LOG, 'a') as f:\n"
        "        f.write(item['question'][:10] + '\\n')\n"
        "    return 1.0 if item['answer'].split('####')[-1].strip() in completion else 0.0\n")
    out = tmp_path / "run"
    for task in (f"jsonl:{files / 'data.jsonl'}", f"jsonl:{files / 'data.jsonl'}@{files / 'counting.py'}:reward"):
        result = subprocess.run([sys.executable, "-m", "qwenlab", "grpo", "--model", "nano", "--tasks", task,
                                 "--out", str(out), "--steps", "2", "--batch", "2", "--num-generations", "2",
                                 "--max-new-tokens", "6", "--threads", "1", "--no-resume",
                                 "--loss-type", "grpo", "--mask-truncated-completions"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        rows = [json.loads(line) for line in (out / "rewards.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and all(0.0 <= r["reward"] <= 1.0 for r in rows)
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == 2 * 2 * 2  # steps x groups x completions, each scored by the user's function
    assert set(calls) <= {"Tom has 3 ", "What is 10"}
