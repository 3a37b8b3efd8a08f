"""The built-in recipe's claims, on a shortened run of its own stages: each specialist gains its skill, no
adapter falls below the forgetting bound, and the tuned merge is at least as good on validation as every
default-parameter merge.

The stages are read from the built-in recipe and run as they are there, shortened where that keeps the
claim: 4 of its 12 stages, and a merge search of at most 3 trials (the recipe's own count; its best trial is
distilled as in the recipe). The specialists keep their steps,
and adapter_eval its 400 instances per task: the test checks the figures the report prints (at 200, one
run on another CPU put sft-repeat's arithmetic at 0.34 against a bar of 0.369). Shorter training tests another claim than the
recipe makes. Repeat's forgetting is transient: at 400 steps it kept 82% of nano's arithmetic, at 800
steps 97-103% (docs/adapters.md). At 150 steps the arithmetic specialist's gain (+0.075 on 200 prompts)
was significant in one run and not in another on the same host, the second on a busy machine.
"""

import json
import subprocess
import sys

import pytest
import yaml

from qwenlab.recipe import BUILTIN_RECIPE
from qwenlab.recipe.stages.adapter_eval import KEEP_FLOOR, KEEP_SHARE


def shortened(tmp_path):
    recipe = yaml.safe_load(BUILTIN_RECIPE.read_text())
    stages = []
    for stage in recipe["stages"]:
        (kind, params), = stage.items()
        if kind == "train" and params["kind"] == "sft":
            stages.append({kind: params})
        elif kind == "adapter_eval":
            params = {**params, "adapters": [p["as"] for s in stages for p in s.values()]}  # the recipe's n
            stages.append({kind: params})
        elif kind == "merge":
            params = {**params, "search": {**params["search"], "trials": 3}}
            stages.append({kind: params})
    assert [next(iter(s)) for s in stages] == ["train", "train", "adapter_eval", "merge"]
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump({"name": "nano-short", "models": recipe["models"], "stages": stages}))
    return path


@pytest.mark.timeout(1200)  # ~260 s alone on 2 cores; tests/conftest.py runs it first
def test_the_shortened_builtin_recipe_gains_each_skill_keeps_the_others_and_tunes_the_merge(tmp_path):
    # A child process, as `qwenlab run` is used: the tests before this one leave PyTorch's thread count and
    # other process state behind, and with other settings training takes another path (in one full test
    # run, sft-repeat kept 0.31 of nano's 0.41 on arithmetic, against 0.385 in a fresh process).
    subprocess.run([sys.executable, "-m", "qwenlab", "run", str(shortened(tmp_path)), "--out", str(tmp_path / "run")],
                   check=True, capture_output=True, timeout=1500)
    figures = json.loads((tmp_path / "run" / "figures.json").read_text())
    report = (tmp_path / "run" / "report.md").read_text()
    accuracy, merge = figures["03-adapter_eval"], figures["04-merge"]
    nano = accuracy["nano"]
    for adapter, task in (("sft-arithmetic", "arithmetic"), ("sft-repeat", "repeat")):
        # the gain is significant by the paired test on the same prompts (the '*' the report prints)
        line = next(line for line in report.splitlines() if line.startswith(f"- {adapter}: gains"))
        assert f"{task} +" in line and "*" in line.split(f"{task} +")[1].split(",")[0], line
        assert accuracy[adapter][task] > nano[task]
        for other, base_score in nano.items():
            if base_score >= KEEP_FLOOR:
                assert accuracy[adapter][other] >= KEEP_SHARE * base_score, (adapter, other, accuracy[adapter])
        assert "keeps every skill" in line
    search = merge["search"]
    defaults = search["defaults_on_validation"]
    assert set(defaults) == {f"merge-{m}" for m in ("linear", "ties", "slerp", "task_arithmetic")}
    assert search["validation_objective"] >= max(d["objective"] for d in defaults.values())
    # and it keeps both skills and nano's others: every default merge loses one (their best worst share was 0.44;
    # regmean_sequential's trials scored 0.76-0.93 on this host, and its distilled best trial 0.90)
    assert search["method"] == "regmean_sequential" and search["validation_objective"] >= 0.75, search
    assert search["refine"] == {"distill_steps": 200}  # the merge written is the distilled best trial
    assert search["refined_on_validation"]["objective"] == search["validation_objective"]
    assert "merge-tuned" in merge["accuracy"] and "| merge-tuned |" in report
