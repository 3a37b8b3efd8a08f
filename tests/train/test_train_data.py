"""Training data: JSONL checks with file:line errors, splits, and data sets built from tasks."""

from __future__ import annotations

import json

import pytest

from qwenlab.errors import QwenlabError
from qwenlab.tasks import EVAL_SEED_LIMIT, score
from qwenlab.train.data import (
    DATA_SEED_OFFSET,
    dpo_records_from_task,
    load_jsonl,
    sft_records_from_task,
    split_records,
    training_instances,
    write_jsonl,
)


def write_lines(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_reads_each_format(tmp_path):
    records, chat = load_jsonl(write_lines(tmp_path / "a.jsonl", [CHAT, "", {**CHAT, "extra": 1}]), "sft")
    assert chat and records == [CHAT, CHAT]  # blank lines skipped, extra keys dropped
    records, chat = load_jsonl(write_lines(tmp_path / "b.jsonl", [{"prompt": "2+2=", "completion": "4"}]), "sft")
    assert not chat and records == [{"prompt": "2+2=", "completion": "4"}]
    pair = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    records, chat = load_jsonl(write_lines(tmp_path / "c.jsonl", [pair]), "dpo")
    assert chat and records == [pair]


@pytest.mark.parametrize("line,message", [
    ('{"messages": [', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": "x"}', "expected keys 'messages' or 'prompt'/'completion'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"prompt": "x", "completion": ""}', "'completion' is empty"),
    ('{"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]}', "string or a list of messages"),
    ('{"prompt": "a", "completion": "b"}', "differs from line 1"),
])
def test_a_bad_line_is_reported_by_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "data.jsonl", [CHAT, line])
    with pytest.raises(QwenlabError, match=message) as error:
        load_jsonl(path, "sft")
    assert f"{path}:2:" in str(error.value)


def test_dpo_needs_three_keys_and_empty_files_fail(tmp_path):
    with pytest.raises(QwenlabError, match=r"data.jsonl:1: expected keys 'prompt'/'chosen'/'rejected'"):
        load_jsonl(write_lines(tmp_path / "data.jsonl", [{"prompt": "a", "chosen": "b"}]), "dpo")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(QwenlabError, match="empty dataset"):
        load_jsonl(tmp_path / "empty.jsonl", "sft")
    with pytest.raises(QwenlabError, match="not found"):
        load_jsonl(tmp_path / "missing.jsonl", "sft")


def test_split_is_seeded_and_keeps_one(tmp_path):
    records = [{"i": i} for i in range(10)]
    train, held = split_records(records, 0.05, seed=1)
    assert len(held) == 1 and len(train) == 9
    assert split_records(records, 0.3, seed=1) == split_records(records, 0.3, seed=1)
    assert split_records(records, 0.0, seed=1) == (records, [])


def test_task_data_never_uses_evaluation_seeds():
    instances = training_instances("arithmetic", 5, seed=3)
    assert all(i.seed >= DATA_SEED_OFFSET > 10_000_000 > EVAL_SEED_LIMIT for i in instances)
    assert [i.seed for i in instances] == [DATA_SEED_OFFSET + 3_000_000 + k for k in range(5)]
    assert training_instances("arithmetic", 5, seed=4)[0].seed != instances[0].seed


@pytest.mark.parametrize("task", ["arithmetic", "reverse", "sort_letters", "count_letter"])
def test_task_records_are_correct_and_rejected_answers_wrong(task):
    for record in sft_records_from_task(task, 20, seed=1):
        assert record["prompt"][0]["role"] == "user" and record["completion"][0]["role"] == "assistant"
    pairs = dpo_records_from_task(task, 50, seed=1)
    for pair in pairs:
        instance_expected = pair["chosen"][0]["content"]
        assert score(task, pair["chosen"][0]["content"], instance_expected) == 1.0
        assert score(task, pair["rejected"][0]["content"], instance_expected) == 0.0
    assert pairs == dpo_records_from_task(task, 50, seed=1)  # deterministic


def test_write_jsonl_round_trips_and_refuses_to_overwrite(tmp_path):
    records = sft_records_from_task("reverse", 3)
    out = write_jsonl(records, tmp_path / "d.jsonl")
    assert load_jsonl(out, "sft") == (records, True)
    with pytest.raises(QwenlabError, match="exists"):
        write_jsonl(records, out)
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]  # no temporary file left


def test_rejected_from_a_model_uses_its_own_wrong_replies(tiny_model_dir):
    from qwenlab.train.data import policy_replies

    records = dpo_records_from_task("reverse", 6, seed=3, rejected_from=str(tiny_model_dir))
    replies = policy_replies(str(tiny_model_dir), [r["prompt"][0]["content"] for r in records])
    own = 0
    for record, reply in zip(records, replies):
        expected = record["chosen"][0]["content"]
        rejected = record["rejected"][0]["content"]
        assert score("reverse", rejected, expected) == 0.0
        if reply.strip() and score("reverse", reply, expected) == 0.0:
            assert rejected == reply  # the model's own mistake, not a synthetic one
            own += 1
    assert own > 0
