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


USER, ANSWER = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}


@pytest.mark.parametrize("record, kind, expected", [
    ({"instruction": "Sum", "input": "2 2", "output": "4"}, "sft",  # Alpaca
     {"prompt": [{"role": "user", "content": "Sum\n\n2 2"}], "completion": [{"role": "assistant", "content": "4"}]}),
    ({"instruction": "Say hi", "output": "hi"}, "sft",
     {"prompt": [{"role": "user", "content": "Say hi"}], "completion": [{"role": "assistant", "content": "hi"}]}),
    ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},  # ShareGPT
                        {"from": "gpt", "value": "a"}]}, "sft",
     {"messages": [{"role": "system", "content": "s"}, USER, ANSWER]}),
    ({"text": "plain text"}, "sft", {"text": "plain text"}),
    ({"chosen": [USER, ANSWER], "rejected": [USER, {"role": "assistant", "content": "b"}]}, "dpo",  # implicit
     {"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "assistant", "content": "b"}]}),
    ({"prompt": "q", "chosen": [USER, ANSWER], "rejected": [USER, {"role": "assistant", "content": "b"}]},  # UltraFeedback
     "dpo", {"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "assistant", "content": "b"}]}),
])
def test_common_formats_are_read_as_trl_records(tmp_path, record, kind, expected):
    jsonl = load_jsonl(write_lines(tmp_path / "d.jsonl", [record, record]), kind)[0]
    (tmp_path / "d.json").write_text(json.dumps([record, record]))
    array = load_jsonl(tmp_path / "d.json", kind)[0]
    assert jsonl == array == [expected, expected]


def test_preference_data_given_to_sft_says_to_use_dpo_and_a_broken_array_says_jsonl_was_expected(tmp_path):
    with pytest.raises(QwenlabError, match=r"d.jsonl:1: preference data .* `qwenlab train dpo`"):
        load_jsonl(write_lines(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}]), "sft")
    (tmp_path / "bad.json").write_text('[{"text": "a"},')
    with pytest.raises(QwenlabError, match="expected JSONL .* or a valid JSON array"):
        load_jsonl(tmp_path / "bad.json", "sft")


def test_messages_train_on_assistant_turns_only():
    from qwenlab.train.data import assistant_only_turns

    system, second = {"role": "system", "content": "s"}, {"role": "user", "content": "q2"}
    conversation = {"messages": [system, USER, ANSWER, second, {"role": "assistant", "content": "a2"}]}
    assert assistant_only_turns([conversation, {"prompt": "p", "completion": "c"}]) == [
        {"prompt": [system, USER], "completion": [ANSWER]},
        {"prompt": [system, USER, ANSWER, second], "completion": [{"role": "assistant", "content": "a2"}]},
        {"prompt": "p", "completion": "c"}]
