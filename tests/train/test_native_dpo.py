"""`train dpo --engine native`: TRL's pairs, TRL's DPO run (losses, eval loss, adapter) for each loss term the
engine computes, gradient accumulation across an epoch's end, bf16, and refusals before any output."""

from __future__ import annotations

import pytest
import torch

from qwenlab.adapters import read_adapter
from qwenlab.train import TrainConfig, train_dpo
from qwenlab.train.data import dpo_records_from_task, write_jsonl
from qwenlab.train.native.batches import step_batches, step_examples
from qwenlab.train.native.dpo import preference_loss
from qwenlab.train.native.preference import collate_pairs, tokenize_pairs


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory):
    return write_jsonl(dpo_records_from_task("arithmetic", 40, seed=1), tmp_path_factory.mktemp("data") / "dpo.jsonl")


def dpo_config(base, data, out, **changes) -> TrainConfig:
    values = dict(base=str(base), data=str(data), out=str(out), steps=6, batch_size=4, save_steps=0, logging_steps=1,
                  lora_r=4, lora_alpha=8, learning_rate=5e-3, val_fraction=0.1, progress=False, threads=1,
                  engine="native", lora_dropout=0.0, seed=3)
    values.update(changes)
    return TrainConfig(**values)


def test_pairs_are_the_ones_trl_builds(tiny_model_dir, tmp_path):
    """Chat and plain-text pairs (EOS added to text completions), and a prompt that fills max_length dropped."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chats = dpo_records_from_task("reverse", 4, seed=2)
    chats.append({"prompt": [{"role": "user", "content": "hello " * 300}],
                  "chosen": [{"role": "assistant", "content": "hi"}], "rejected": [{"role": "assistant", "content": "no"}]})
    texts = [{"prompt": "What is 12 + 7?", "chosen": " 19", "rejected": " 21"},
             {"prompt": "Reverse: apple", "chosen": " elppa", "rejected": " apple"}]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for records in (chats, texts):
        trainer = DPOTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(records),
                             args=DPOConfig(output_dir=str(tmp_path / "trl"), max_length=200, report_to="none",
                                            use_cpu=True, bf16=False))
        theirs = [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in trainer.train_dataset]
        ours = [(p.prompt, p.chosen, p.rejected) for p in tokenize_pairs(records, tokenizer, 200)]
        assert ours == theirs and len(ours) == len(records) - (records is chats)


@pytest.mark.parametrize("changes", [dict(), dict(grad_accum=2, steps=7), dict(dpo_loss=["sigmoid", "sft"]),
                                     dict(dpo_loss=["ipo"]), dict(dpo_loss=["hinge"], beta=0.5)],
                         ids=["sigmoid", "accumulated", "sigmoid+sft", "ipo", "hinge"])
def test_the_same_run_as_the_trl_engine(tiny_model_dir, dpo_data, tmp_path, changes):
    """Same seed, data and init, no dropout: every logged loss, the eval loss and the adapter equal TRL's, to float
    rounding. 36 pairs in batches of 4: with accumulation 2, the fifth step is an epoch's last batch alone."""
    trl = train_dpo(dpo_config(tiny_model_dir, dpo_data, tmp_path / "trl", engine="trl", **changes))
    native = train_dpo(dpo_config(tiny_model_dir, dpo_data, tmp_path / "native", **changes))
    theirs = {e["step"]: e["loss"] for e in trl.log_history if "loss" in e}
    ours = {e["step"]: e["loss"] for e in native.log_history if "loss" in e}
    assert sorted(ours) == sorted(theirs) == list(range(1, native.steps + 1))
    for step in theirs:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-4, abs=1e-5), step
    assert native.eval_loss == pytest.approx(trl.eval_loss, rel=1e-4)
    assert len({round(v, 4) for v in ours.values()}) > 2  # the policy moved: the losses are not all the first one
    trl_rewards = {e["step"]: e["rewards/margins"] for e in trl.log_history if "rewards/margins" in e}
    native_rewards = {e["step"]: e["rewards/margins"] for e in native.log_history if "rewards/margins" in e}
    if "grad_accum" not in changes:  # TRL logs the mean over the step's micro-batches too
        assert native_rewards == pytest.approx(trl_rewards, rel=1e-3, abs=1e-5)
    ours_adapter, theirs_adapter = read_adapter(tmp_path / "native"), read_adapter(tmp_path / "trl")
    for name, (a, b) in theirs_adapter.modules.items():
        torch.testing.assert_close(ours_adapter.modules[name][0], a, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(ours_adapter.modules[name][1], b, atol=1e-4, rtol=1e-3)


def test_accumulation_groups_batches_within_an_epoch():
    # 9 batches an epoch in groups of 2: updates of 2, 2, 2, 2 and 1 batches, then the next epoch
    steps = [step_batches(36, 4, 2, 3, step) for step in range(6)]
    assert [len(s) for s in steps] == [2, 2, 2, 2, 1, 2]
    assert steps[4] == [step_examples(36, 4, 3, 8)] and steps[5][0] == step_examples(36, 4, 3, 9)


def test_the_loss_terms_on_known_numbers():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0], [-3.0, -1.0], [-1.0, -1.0]])  # 2 pairs: rows 0-1 chosen
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    ref = torch.tensor([-2.0, -1.0, -3.0, -2.0])
    tokens = torch.tensor([2.0, 1.0, 2.0, 1.0])
    # log-ratios: chosen (-3+2, 0+1) = (-1, 1); rejected (-4+3, -1+2) = (-1, 1); delta (0, 0)
    loss, stats = preference_loss(logprobs, mask, ref, tokens, ["sigmoid"], beta=0.1)
    assert float(loss) == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert stats["rewards/margins"] == 0.0 and stats["rewards/chosen"] == pytest.approx(0.0)
    loss, _ = preference_loss(logprobs, mask, ref, tokens, ["ipo"], beta=0.5)
    assert float(loss) == pytest.approx(1.0)  # (0 - 1/(2·0.5))²
    loss, _ = preference_loss(logprobs, mask, ref, tokens, ["sft"], beta=0.5)
    assert float(loss) == pytest.approx(1.0)  # -mean(-1, -2, 0) over the chosen rows' completion tokens


def test_bf16_follows_the_fp32_run(tiny_model_dir, dpo_data, tmp_path):
    fp32 = train_dpo(dpo_config(tiny_model_dir, dpo_data, tmp_path / "fp32", val_fraction=0.0))
    bf16 = train_dpo(dpo_config(tiny_model_dir, dpo_data, tmp_path / "bf16", val_fraction=0.0, dtype="bf16"))
    a = [e["loss"] for e in fp32.log_history if "loss" in e]
    b = [e["loss"] for e in bf16.log_history if "loss" in e]
    assert b == pytest.approx(a, abs=2e-2)


def test_pairs_collate_chosen_first_with_completion_targets(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = tokenize_pairs(dpo_records_from_task("arithmetic", 3, seed=0), tokenizer, 512)
    batch = collate_pairs(pairs, tokenizer.pad_token_id or 0, 512)
    assert batch.tokens.shape[0] == 6 and batch.pairs == 3
    for row, pair in enumerate(pairs):
        for offset, completion in ((0, pair.chosen), (3, pair.rejected)):
            ids = batch.tokens[row + offset].tolist()
            assert ids[:len(pair.prompt) + len(completion)] == pair.prompt + completion
            targets = batch.target_mask[row + offset].nonzero().flatten().tolist()
            assert [ids[t + 1] for t in targets] == completion  # exactly the completion's tokens are scored
    cut = collate_pairs(pairs, 0, len(pairs[0].prompt) + 1)  # max_length keeps one completion token
    assert int(cut.target_mask[0].sum()) == 1


def test_the_default_learning_rate_is_dpos(tiny_model_dir, dpo_data, tmp_path):
    from qwenlab.train.config import DEFAULT_LEARNING_RATE
    from qwenlab.train.native.dpo import NativeDPO
    from qwenlab.train.run import prepare_run

    trainer = NativeDPO(prepare_run(dpo_config(tiny_model_dir, dpo_data, tmp_path / "out", learning_rate=None), "dpo"))
    assert trainer.scheduler.base_lrs == [DEFAULT_LEARNING_RATE["dpo"]] != [DEFAULT_LEARNING_RATE["sft"]]
