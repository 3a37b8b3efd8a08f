"""`engine: native` SFT: TRL's examples, PEFT's loss and step, checkpoints and resume, bf16, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qwenlab.adapters import read_adapter
from qwenlab.cli import main
from qwenlab.errors import QwenlabError
from qwenlab.train import TrainConfig, train_dpo, train_sft
from qwenlab.train.data import sft_records_from_task, write_jsonl
from qwenlab.train.native.batches import collate, step_examples, tokenize_examples
from qwenlab.train.native.sft import NativeSFT
from qwenlab.train.run import prepare_run


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_jsonl(sft_records_from_task("arithmetic", 40, seed=1), tmp_path_factory.mktemp("data") / "sft.jsonl")


def native_config(base, data, out, **changes) -> TrainConfig:
    values = dict(base=str(base), data=str(data), out=str(out), steps=6, batch_size=4, save_steps=3, logging_steps=1,
                  lora_r=4, lora_alpha=8, learning_rate=5e-3, val_fraction=0.1, progress=False, threads=1,
                  engine="native")
    values.update(changes)
    return TrainConfig(**values)


def losses(history: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in history if "loss" in e}


def test_examples_are_the_ones_trl_builds(tiny_model_dir, tmp_path):
    """Token ids and loss targets equal TRL's prepared dataset for chat prompt/completion, plain-text
    prompt/completion and plain text, truncation and the dropping of examples left without a target."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chats = sft_records_from_task("reverse", 5, seed=3)
    chats.append({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello " * 300}],
                  "completion": [{"role": "assistant", "content": "world"}]})  # prompt alone passes max_length
    texts = [{"prompt": "What is 12 + 7?", "completion": " 19"}, {"prompt": "Reverse: apple", "completion": " elppa"}]
    plain = [{"text": "hello world"}, {"text": "The answer is 19."}]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for records in (chats, texts, plain):
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(records),
                             args=SFTConfig(output_dir=str(tmp_path / "trl"), max_length=200, report_to="none",
                                            use_cpu=True, bf16=False))
        theirs = [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]
        ours = tokenize_examples(records, tokenizer, 200)
        assert len(ours) == len(theirs) == len(records) - (records is chats)  # the long prompt is dropped
        for example, (ids, labels) in zip(ours, theirs):
            assert example.ids == ids
            assert [t if m else -100 for t, m in zip(example.ids, example.loss_mask)] == labels


def test_batches_come_in_the_order_of_transformers_trainer(tiny_model_dir, tmp_path):
    """Three epochs of 7 examples in batches of 3 (a short last batch each epoch), seed 5: the same rows, in
    the same batches, as the Trainer's own train dataloader gives TRL."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = [{"text": f"example {i} " + "x" * i} for i in range(7)]
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), processing_class=tokenizer,
                         train_dataset=Dataset.from_list(records),
                         args=SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=3, seed=5,
                                        data_seed=5, report_to="none", use_cpu=True, bf16=False))
    loader = trainer.get_train_dataloader()
    theirs = [[[t for t, m in zip(row, mask) if m] for row, mask in zip(batch["input_ids"].tolist(),
                                                                        batch["attention_mask"].tolist())]
              for _ in range(3) for batch in loader]
    examples = tokenize_examples(records, tokenizer, 512)
    ours = [[examples[i].ids for i in step_examples(7, 3, 5, step)] for step in range(9)]
    assert [len(b) for b in ours] == [3, 3, 1] * 3
    assert ours == theirs


def test_loss_and_steps_equal_a_peft_loop_from_the_same_init(tiny_model_dir, sft_data, tmp_path):
    """Five AdamW steps on the same batches from the same LoRA init: the native loss (head on target positions
    only, in chunks) equals PEFT + transformers' full-logits loss, and so do the trained weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = native_config(tiny_model_dir, sft_data, tmp_path / "native", lora_dropout=0.0, scheduler="constant",
                           warmup=0, val_fraction=0.0, learning_rate=1e-2, steps=5)
    native = NativeSFT(prepare_run(config, "sft"))
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                          LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(config.target_modules)))
    start = native.adapter()
    with torch.no_grad():
        for name, (a, b) in start.modules.items():
            module = peft.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for step in range(5):
        (batch,) = native.micro_batches(step)
        labels = batch.tokens.clone()
        labels[:, 1:][batch.target_mask == 0] = -100
        labels[:, 0] = -100
        valid = torch.zeros_like(batch.tokens)
        for row, example in enumerate(step_examples(len(native.train_examples), 4, config.seed, step)):
            valid[row, :len(native.train_examples[example].ids)] = 1
        peft.train()
        loss = peft(input_ids=batch.tokens, attention_mask=valid, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in peft.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        stats = native.train_step()
        assert stats["loss"] == pytest.approx(float(loss.detach()), rel=1e-5), step
    trained = native.adapter()
    for name, (a, b) in trained.modules.items():
        module = peft.base_model.model.get_submodule(name)
        torch.testing.assert_close(a, module.lora_A["default"].weight, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(b, module.lora_B["default"].weight, atol=2e-5, rtol=1e-4)
    assert any(float(b.abs().max()) > 1e-3 for _, b in trained.modules.values())  # the steps moved B off zero


def test_the_same_run_as_the_trl_engine(tiny_model_dir, sft_data, tmp_path):
    """Same seed, same data, no dropout: the native engine starts from PEFT's very LoRA init, takes the Trainer's
    batches in its order with its schedule, and so logs TRL's loss curve and ends at TRL's adapter, to float
    rounding. Two epochs of 36 examples in batches of 8 (a short last batch), warmup and a cosine decay."""
    changes = dict(lora_dropout=0.0, val_fraction=0.1, steps=10, batch_size=8, warmup=0.2, seed=7, save_steps=0, logging_steps=3,
                   learning_rate=1e-2)
    trl = train_sft(native_config(tiny_model_dir, sft_data, tmp_path / "trl", engine="trl", **changes))
    native = train_sft(native_config(tiny_model_dir, sft_data, tmp_path / "native", **changes))
    theirs, ours = losses(trl.log_history), losses(native.log_history)
    assert sorted(ours) == sorted(theirs) == [1, 3, 6, 9]  # each the mean since the last log, as transformers logs
    for step in theirs:
        assert ours[step] == pytest.approx(theirs[step], rel=2e-4, abs=2e-4), step
    assert native.eval_loss == pytest.approx(trl.eval_loss, rel=2e-4)
    rates = {e["step"]: e["learning_rate"] for e in trl.log_history if "learning_rate" in e}
    assert {e["step"]: e["learning_rate"] for e in native.log_history if "learning_rate" in e} == pytest.approx(rates)
    assert native.tokens_seen == trl.tokens_seen
    ours_adapter, theirs_adapter = read_adapter(tmp_path / "native"), read_adapter(tmp_path / "trl")
    assert set(ours_adapter.modules) == set(theirs_adapter.modules)
    for name, (a, b) in theirs_adapter.modules.items():
        torch.testing.assert_close(ours_adapter.modules[name][0], a, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(ours_adapter.modules[name][1], b, atol=1e-4, rtol=1e-3)


def test_run_folder_checkpoints_and_resume_continue_exactly(tiny_model_dir, sft_data, tmp_path):
    full = train_sft(native_config(tiny_model_dir, sft_data, tmp_path / "full"))
    out = tmp_path / "full"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "lineage.json",
                 "loss_curve.png", "training_log.json"):
        assert (out / name).is_file(), name
    for name in ("native_state.pt", "trainer_state.json", "adapter_model.safetensors"):
        assert (out / "checkpoints" / "checkpoint-3" / name).is_file(), name
    assert not (tmp_path / "full.partial").exists()
    assert full.steps == 6 and full.eval_loss is not None and full.tokens_seen > 0
    curve = losses(full.log_history)
    assert sorted(curve) == [1, 2, 3, 4, 5, 6] and curve[6] < curve[1]
    adapter = read_adapter(out)
    assert adapter.ranks() == {4} and adapter.alpha == 8 and len(adapter.modules) == 3 * 7

    resumed_out = tmp_path / "resumed"
    (resumed_out / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "checkpoint-3", resumed_out / "checkpoints" / "checkpoint-3")
    shutil.copy(out / "checkpoints" / "run_config.json", resumed_out / "checkpoints" / "run_config.json")
    resumed = train_sft(native_config(tiny_model_dir, sft_data, resumed_out, resume=True))
    after = losses(resumed.log_history)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(curve[step], abs=1e-6), step
    for name, (a, b) in read_adapter(resumed_out).modules.items():
        torch.testing.assert_close(b, adapter.modules[name][1])

    # a checkpoint written by the other engine is refused by name, not loaded wrongly
    (resumed_out / "checkpoints" / "checkpoint-6" / "native_state.pt").unlink()
    shutil.rmtree(resumed_out / "checkpoints" / "checkpoint-3")
    with pytest.raises(QwenlabError, match="not a checkpoint of the native engine"):
        train_sft(native_config(tiny_model_dir, sft_data, resumed_out, resume=True))


def test_ctrl_c_saves_and_the_printed_command_resumes(tiny_model_dir, sft_data, tmp_path, monkeypatch, capsys):
    real_step, calls = NativeSFT.train_step, []

    def interrupted_step(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(NativeSFT, "train_step", interrupted_step)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train_sft(native_config(tiny_model_dir, sft_data, out, save_steps=100, val_fraction=0.0))
    err = capsys.readouterr().err
    assert f"interrupted at step 2 (checkpoint-2 saved); resume with: qwenlab train sft --out {out} --resume" in err
    monkeypatch.setattr(NativeSFT, "train_step", real_step)
    assert main(["train", "sft", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert read_adapter(out).ranks() == {4} and "checkpoint-2" in capsys.readouterr().err
    log = json.loads((out / "training_log.json").read_text())
    assert log["summary"]["steps"] == 6 and log["config"]["engine"] == "native"


def test_bf16_keeps_the_base_in_bf16_and_follows_the_fp32_run(tiny_model_dir, sft_data, tmp_path):
    runs = {}
    for dtype in ("fp32", "bf16"):
        config = native_config(tiny_model_dir, sft_data, tmp_path / dtype, dtype=dtype, steps=12, val_fraction=0.0,
                               lora_dropout=0.0, learning_rate=2e-2)
        runs[dtype] = NativeSFT(prepare_run(config, "sft"))
    bf16 = runs["bf16"]
    assert bf16.model.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bf16.params)  # LoRA weights and AdamW's state in fp32
    curves = {dtype: [trainer.train_step()["loss"] for _ in range(12)] for dtype, trainer in runs.items()}
    assert curves["fp32"][-1] < curves["fp32"][0] - 0.05  # the run learns ...
    for step, (x, y) in enumerate(zip(curves["fp32"], curves["bf16"])):
        assert y == pytest.approx(x, rel=0.02), step  # ... and bf16 follows it


def test_gradient_checkpointing_recomputes_to_the_same_step(tiny_model_dir, sft_data, tmp_path, monkeypatch):
    plain, recomputed = (NativeSFT(prepare_run(native_config(tiny_model_dir, sft_data, tmp_path / name,
                                                             lora_dropout=0.0, val_fraction=0.0,
                                                             gradient_checkpointing=name == "ckpt"), "sft"))
                         for name in ("plain", "ckpt"))
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    a, b = plain.train_step(), recomputed.train_step()
    assert len(calls) == 3  # one per layer, in the checkpointed run only
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for (x, _), (y, _) in zip(plain.adapter().modules.values(), recomputed.adapter().modules.values()):
        torch.testing.assert_close(x, y)


def test_grad_accumulation_normalises_over_the_whole_step(tiny_model_dir, sft_data, tmp_path):
    """batch 4 x accumulation 2 takes the same step as batch 8 of the same examples: one mean over all targets."""
    one = NativeSFT(prepare_run(native_config(tiny_model_dir, sft_data, tmp_path / "a", batch_size=8,
                                              lora_dropout=0.0, val_fraction=0.0), "sft"))
    two = NativeSFT(prepare_run(native_config(tiny_model_dir, sft_data, tmp_path / "b", batch_size=4, grad_accum=2,
                                              lora_dropout=0.0, val_fraction=0.0), "sft"))
    # the same eight examples in both: the accumulated step's two micro-batches are batch 8's two halves
    order = step_examples(len(one.train_examples), 8, 0, 0)
    two.micro_batches = lambda step: [collate([two.train_examples[i] for i in order[:4]], two.pad_id),
                                      collate([two.train_examples[i] for i in order[4:]], two.pad_id)]
    a, b = one.train_step(), two.train_step()
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["targets"] == b["targets"]
    for (x, _), (y, _) in zip(one.adapter().modules.values(), two.adapter().modules.values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_bad_engine_and_dpo_loss_fail_before_any_output(tiny_model_dir, sft_data, tmp_path):
    with pytest.raises(QwenlabError, match="'engine' must be one of trl, native"):
        native_config(tiny_model_dir, sft_data, tmp_path / "out", engine="fast").validate()
    with pytest.raises(QwenlabError, match="'dpo_loss': the native engine computes sigmoid, hinge, ipo, sft, not "
                                           "robust; train it with 'engine: trl'"):
        train_dpo(native_config(tiny_model_dir, sft_data, tmp_path / "out", dpo_loss=["sigmoid", "robust"]))
    long = tmp_path / "long.jsonl"
    write_jsonl([{"prompt": [{"role": "user", "content": "hello " * 50}],
                  "completion": [{"role": "assistant", "content": "hi"}]}], long)
    with pytest.raises(QwenlabError, match="no training example has a target token within max_length 32"):
        train_sft(native_config(tiny_model_dir, long, tmp_path / "out", max_length=32, val_fraction=0.0))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("engine", ["native", "trl"])
def test_early_stopping_stops_after_the_patience_and_keeps_the_best_adapter(tiny_model_dir, sft_data, tmp_path, engine):
    # Eval loss on another task than the one trained: it falls for a step or two, then climbs as the adapter
    # specialises, which is what early stopping is for.
    other = write_jsonl(sft_records_from_task("reverse", 12, seed=2), tmp_path / "reverse.jsonl")
    result = train_sft(native_config(tiny_model_dir, sft_data, tmp_path / "out", engine=engine, steps=30,
                                     eval_data=str(other), eval_steps=1, save_steps=1, save_total_limit=0,
                                     learning_rate=3e-2, lora_dropout=0.0, early_stopping=2))
    evals = [(e["step"], e["eval_loss"]) for e in result.log_history if "eval_loss" in e]
    best_step, best = min(evals, key=lambda e: e[1])
    assert result.steps == best_step + 2 < 30, evals  # two evaluations without a lower loss, then stop
    assert result.eval_loss == pytest.approx(best) and result.train_loss is not None  # the kept adapter's
    assert [loss for step, loss in evals if step > best_step] and all(
        loss >= best for step, loss in evals if step > best_step)
    kept, at_best = read_adapter(tmp_path / "out"), read_adapter(tmp_path / "out" / "checkpoints" /
                                                                 f"checkpoint-{best_step}")
    last = read_adapter(tmp_path / "out" / "checkpoints" / f"checkpoint-{result.steps}") if engine == "trl" else None
    for name, (a, b) in at_best.modules.items():
        torch.testing.assert_close(kept.modules[name][0], a)
        torch.testing.assert_close(kept.modules[name][1], b)
    if last is not None:  # the run did move on after the best step: keeping it is a choice, not a no-op
        assert any(not torch.equal(last.modules[n][1], b) for n, (_, b) in at_best.modules.items())


def test_early_stopping_without_eval_data_is_refused(tiny_model_dir, sft_data, tmp_path):
    with pytest.raises(QwenlabError, match="'early_stopping' watches the eval loss"):
        native_config(tiny_model_dir, sft_data, tmp_path / "out", val_fraction=0.0, early_stopping=2).validate()
    with pytest.raises(QwenlabError, match="'save_steps' \\(3\\) must be a multiple of 'eval_steps' \\(2\\)"):
        native_config(tiny_model_dir, sft_data, tmp_path / "out", eval_steps=2, early_stopping=2).validate()
