"""Replay: the base's own greedy answers to other prompts, mixed into SFT data."""

import json

import pytest

from qwenlab.errors import QwenlabError
from qwenlab.train import TrainConfig
from qwenlab.train.replay import file_prompts, mix, replay_count, task_prompts


def test_the_share_is_of_the_final_set():
    assert replay_count(300, 0.25) == 100  # 100 of 400
    assert replay_count(300, 0.0) == 0
    with pytest.raises(QwenlabError, match="share from 0 to below 1"):
        replay_count(300, 1.0)


def test_task_prompts_are_deterministic_round_robin_at_seeds_no_evaluation_uses():
    from qwenlab.tasks import generate
    from qwenlab.tasks.registry import EVAL_SEED_LIMIT
    from qwenlab.train.replay import REPLAY_SEED_OFFSET

    prompts = task_prompts(["reverse", "arithmetic"], 6, seed=0)
    assert prompts == task_prompts(["reverse", "arithmetic"], 6, seed=0)
    assert [p[0]["content"].startswith("Reverse") for p in prompts] == [True, False] * 3
    assert prompts[0][0]["content"] == generate("reverse", REPLAY_SEED_OFFSET, 1).prompt  # difficulty cycles from 1
    assert prompts[2][0]["content"] == generate("reverse", REPLAY_SEED_OFFSET + 1, 2).prompt
    assert REPLAY_SEED_OFFSET > EVAL_SEED_LIMIT


def test_file_prompts_take_messages_up_to_the_last_user_turn(tmp_path):
    path = tmp_path / "general.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello!"}]}) + "\n"
                    + json.dumps({"prompt": "Name a colour."}) + "\n")
    prompts = file_prompts(path, 4)
    assert len(prompts) == 4 and {len(p) for p in prompts} == {1, 2}
    assert [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}] in prompts
    path.write_text(json.dumps({"text": "no prompt here"}) + "\n")
    with pytest.raises(QwenlabError, match=r"general.jsonl:1: expected 'messages' with a user turn"):
        file_prompts(path, 1)


def test_a_replay_run_trains_on_the_base_answers(tmp_path):
    from qwenlab.model import GenerationConfig, generate, load_model, load_tokenizer
    from qwenlab.nano import nano_path
    from qwenlab.train.data import sft_records_from_task, write_jsonl
    from qwenlab.train.run import prepare_run

    data = write_jsonl(sft_records_from_task("repeat", 30, difficulty=1), tmp_path / "d.jsonl")
    config = TrainConfig(base="nano", data=str(data), out=str(tmp_path / "out"), val_fraction=0, replay=0.25,
                         replay_tasks=["reverse", "sort_letters"], progress=False)
    run = prepare_run(config, "sft")
    assert len(run.train_records) == 40  # 30 + 10 (a quarter of the set)
    replayed = [r for r in run.train_records if not r["prompt"][0]["content"].startswith("Repeat")]
    assert len(replayed) == 10
    model, tokenizer = load_model(nano_path()), load_tokenizer(nano_path())
    answers = generate(model, tokenizer, [r["prompt"] for r in replayed], GenerationConfig(max_new_tokens=96),
                       chat=True)
    assert [r["completion"][0]["content"] for r in replayed] == [a.text for a in answers]


def test_replay_is_refused_on_plain_text(tmp_path):
    from qwenlab.train.run import prepare_run

    data = tmp_path / "t.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(8)) + "\n")
    config = TrainConfig(base="nano", data=str(data), out=str(tmp_path / "out"), replay=0.2, progress=False)
    with pytest.raises(QwenlabError, match="replay needs chat-format data"):
        prepare_run(config, "sft")


def test_mix_keeps_every_record_in_a_seeded_order():
    train, replay = [{"i": i} for i in range(5)], [{"r": i} for i in range(3)]
    assert mix(train, replay, 0) == mix(train, replay, 0) != train + replay
    assert sorted(map(str, mix(train, replay, 1))) == sorted(map(str, train + replay))


def test_reference_replay_rehearses_the_tasks_own_answers_at_the_replay_prompts():
    from qwenlab.tasks import generate
    from qwenlab.train.replay import REPLAY_SEED_OFFSET, task_reference_records

    records = task_reference_records(["reverse", "arithmetic"], 6, seed=0)
    assert [r["prompt"] for r in records] == task_prompts(["reverse", "arithmetic"], 6, seed=0)
    first = generate("reverse", REPLAY_SEED_OFFSET, 1)
    assert records[0]["completion"] == [{"role": "assistant", "content": first.expected}]
    assert all(r["completion"][0]["content"] for r in records)


def test_reference_replay_from_a_file_takes_each_chats_last_assistant_turn(tmp_path):
    from qwenlab.train.replay import file_reference_records

    path = tmp_path / "general.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}]
    path.write_text(json.dumps({"messages": chat}) + "\n"
                    + json.dumps({"prompt": "Name a colour.", "completion": "Blue."}) + "\n")
    records = file_reference_records(path, 4)
    assert len(records) == 4
    assert {"prompt": chat[:4], "completion": [chat[4]]} in records
    assert {"prompt": [{"role": "user", "content": "Name a colour."}],
            "completion": [{"role": "assistant", "content": "Blue."}]} in records
    path.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"prompt": "No answer here"}) + "\n")
    with pytest.raises(QwenlabError, match=r"general.jsonl:2: replay_answers 'reference' needs an answer"):
        file_reference_records(path, 1)


def test_a_reference_replay_run_trains_on_reference_answers_without_asking_the_base(tmp_path, monkeypatch):
    from qwenlab.train import replay
    from qwenlab.train.data import sft_records_from_task, write_jsonl
    from qwenlab.train.run import prepare_run

    def no_base_answers(*args, **kwargs):
        raise AssertionError("reference replay asked the base for answers")

    monkeypatch.setattr(replay, "replay_records", no_base_answers)
    data = write_jsonl(sft_records_from_task("repeat", 30, difficulty=1), tmp_path / "d.jsonl")
    config = TrainConfig(base="nano", data=str(data), out=str(tmp_path / "out"), val_fraction=0, replay=0.25,
                         replay_tasks=["reverse", "arithmetic"], replay_answers="reference", progress=False)
    run = prepare_run(config, "sft")
    replayed = [r for r in run.train_records if not r["prompt"][0]["content"].startswith("Repeat")]
    expected = replay.task_reference_records(["reverse", "arithmetic"], 10, seed=0)
    assert sorted(map(json.dumps, replayed)) == sorted(map(json.dumps, expected))


def test_replay_answers_other_than_base_or_reference_are_refused(tmp_path):
    config = TrainConfig(base="nano", data=str(tmp_path / "d.jsonl"), out=str(tmp_path / "out"), replay=0.2,
                         replay_answers="teacher")
    with pytest.raises(QwenlabError, match="'replay_answers' must be 'base' or 'reference', got 'teacher'"):
        config.validate("train sft")


def test_with_early_stopping_the_held_out_split_gets_its_share_of_replay_and_training_keeps_its_own(tmp_path):
    from qwenlab.train import replay
    from qwenlab.train.data import sft_records_from_task, write_jsonl
    from qwenlab.train.run import prepare_run

    data = write_jsonl(sft_records_from_task("repeat", 40, difficulty=1), tmp_path / "d.jsonl")
    settings = dict(base="nano", data=str(data), val_fraction=0.25, replay=0.5, replay_tasks=["reverse", "arithmetic"],
                    replay_answers="reference", progress=False)
    plain = prepare_run(TrainConfig(out=str(tmp_path / "a"), **settings), "sft")
    watched = prepare_run(TrainConfig(out=str(tmp_path / "b"), early_stopping=2, **settings), "sft")

    def others(records):
        return [r for r in records if not r["prompt"][0]["content"].startswith("Repeat")]

    assert sorted(map(json.dumps, watched.train_records)) == sorted(map(json.dumps, plain.train_records))
    assert others(plain.eval_records) == [] and len(plain.eval_records) == 10
    # 10 held-out repeat examples, and 10 replay examples after the 30 that training took: a half, as in training
    held_out = others(watched.eval_records)
    assert len(watched.eval_records) == 20 and len(held_out) == 10
    everything = replay.task_reference_records(["reverse", "arithmetic"], 40, seed=0)
    assert sorted(map(json.dumps, held_out)) == sorted(map(json.dumps, everything[30:]))
    assert not set(map(json.dumps, held_out)) & set(map(json.dumps, others(watched.train_records)))
