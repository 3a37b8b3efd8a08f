"""TRL training smoke tests on a tiny model: checkpoints, exact resume, the adapter folder, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qwenlab.adapters import active_adapters, attach_adapter, read_adapter
from qwenlab.cli import main
from qwenlab.errors import QwenlabError
from qwenlab.model import load_model
from qwenlab.train import TrainConfig, load_train_config, train_sft
from qwenlab.train.data import sft_records_from_task, write_jsonl
from tests.conftest import build_hf_model


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_jsonl(sft_records_from_task("arithmetic", 40, seed=1), tmp_path_factory.mktemp("data") / "sft.jsonl")


def small_config(base, data, out, **changes) -> TrainConfig:
    values = dict(base=str(base), data=str(data), out=str(out), steps=6, batch_size=4, save_steps=3, logging_steps=1,
                  lora_r=4, lora_alpha=8, learning_rate=5e-3, val_fraction=0.1, progress=False, threads=1)
    values.update(changes)
    return TrainConfig(**values)


def losses(history: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in history if "loss" in e}


def test_sft_checkpoints_and_resume_continues_exactly(tiny_model_dir, sft_data, tmp_path):
    full = train_sft(small_config(tiny_model_dir, sft_data, tmp_path / "full"))
    out = tmp_path / "full"
    # the run folder: a PEFT adapter with tokenizer, lineage, loss curve; resumable checkpoints
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "lineage.json",
                 "loss_curve.png", "training_log.json"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "adapter_model.safetensors"):
        assert (out / "checkpoints" / "checkpoint-3" / name).is_file(), name
    assert json.loads((out / "lineage.json").read_text())["kind"] == "adapter"
    assert full.steps == 6 and full.eval_loss is not None
    curve = losses(full.log_history)
    assert sorted(curve) == [1, 2, 3, 4, 5, 6] and curve[6] < curve[1]

    # An interrupted run left checkpoint-3 behind: --resume must give the same losses as not stopping.
    resumed_out = tmp_path / "resumed"
    (resumed_out / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "checkpoint-3", resumed_out / "checkpoints" / "checkpoint-3")
    shutil.copy(out / "checkpoints" / "run_config.json", resumed_out / "checkpoints" / "run_config.json")
    resumed = train_sft(small_config(tiny_model_dir, sft_data, resumed_out, resume=True))
    after = losses(resumed.log_history)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]  # the curve continues: history from the checkpoint + new steps
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(curve[step], abs=1e-6), step
    evals = lambda h: [e["eval_loss"] for e in h if "eval_loss" in e]
    assert evals(resumed.log_history) == pytest.approx(evals(full.log_history), abs=1e-6)

    # The trained adapter runs in qwenlab's core with PEFT's logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 290, (1, 9), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                           out).eval()
    model = load_model(tiny_model_dir, "fp32")
    attach_adapter(model, out, "sft")
    with torch.no_grad(), active_adapters(model, "sft"):
        assert (model(tokens) - peft_model(tokens).logits).abs().max().item() <= 1e-4
    assert read_adapter(out).ranks() == {4}

    # resuming with other settings is refused, naming the setting
    with pytest.raises(QwenlabError, match="'lora_r' was 4"):
        train_sft(small_config(tiny_model_dir, sft_data, resumed_out, resume=True, lora_r=8))


def test_dpo_from_task_data_through_the_cli(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    assert main(["data", "dpo", str(data), "--task", "reverse", "--n", "12", "--seed", "2"]) == 0
    config = tmp_path / "dpo.yaml"
    config.write_text(f"base: {tiny_model_dir}\ndata: {data}\nsteps: 2\nbatch_size: 4\nlora_r: 2\n"
                      "target_modules: [q_proj, v_proj]\nval_fraction: 0\n")
    assert main(["train", "dpo", "--config", str(config), "--out", str(tmp_path / "dpo"), "--no-progress",
                 "--threads", "1"]) == 0
    assert "2 steps" in capsys.readouterr().out
    adapter = read_adapter(tmp_path / "dpo")
    assert adapter.target_modules() == ["q_proj", "v_proj"] and adapter.ranks() == {2}
    assert json.loads((tmp_path / "dpo" / "lineage.json").read_text())["method"] == "lora-dpo"


def test_bad_input_fails_before_any_output(tiny_model_dir, sft_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(sft_data.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(QwenlabError, match=r"bad.jsonl:2: invalid JSON"):
        train_sft(small_config(tiny_model_dir, bad, tmp_path / "out"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(QwenlabError, match="empty dataset"):
        train_sft(small_config(tiny_model_dir, empty, tmp_path / "out"))
    no_template = tmp_path / "no-template"
    build_hf_model(no_template)
    config_path = no_template / "tokenizer_config.json"
    config_path.write_text(json.dumps({k: v for k, v in json.loads(config_path.read_text()).items()
                                       if k != "chat_template"}))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(QwenlabError, match="no chat template"):
        train_sft(small_config(no_template, sft_data, tmp_path / "out"))
    with pytest.raises(QwenlabError, match="no checkpoint-N folder"):
        train_sft(small_config(tiny_model_dir, sft_data, tmp_path / "out", resume=True))
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    with pytest.raises(QwenlabError, match="exists"):
        train_sft(small_config(tiny_model_dir, sft_data, tmp_path / "out"))


def test_yaml_config_errors_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: d.jsonl\nout: o\nlora_rank: 8\n")
    with pytest.raises(QwenlabError, match=r"c.yaml: unknown key 'lora_rank'"):
        load_train_config(path)
    path.write_text("data: d.jsonl\nout: o\nlora_r: eight\n")
    with pytest.raises(QwenlabError, match=r"c.yaml: 'lora_r' must be int"):
        load_train_config(path)
    path.write_text("data: d.jsonl\nout: o\nlora_r: 8\ntarget_modules: [q_proj, lm_head]\n")
    with pytest.raises(QwenlabError, match="target_modules.*lm_head"):
        load_train_config(path)
    path.write_text("data: d.jsonl\nout: o\nlora_r: 8\ndtype: fp16\n")
    with pytest.raises(QwenlabError, match="fp16 is not supported"):
        load_train_config(path)
    path.write_text("data: d.jsonl\nout: o\nlora_r: 8\n")
    config = load_train_config(path, {"lora_r": "4", "rslora": True, "target_modules": "q_proj,v_proj"})
    assert (config.lora_r, config.rslora, config.target_modules) == (4, True, ["q_proj", "v_proj"])
    assert config.dtype == "fp32" and config.lora_alpha == 32 and config.lora_dropout == 0.05


def test_sft_through_the_cli_with_flags_only(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    assert main(["data", "sft", str(data), "--task", "count_letter", "--n", "4", "--difficulty", "1"]) == 0
    assert main(["train", "sft", "--base", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--steps", "1", "--batch-size", "2", "--lora-r", "2", "--rslora", "--val-fraction", "0",
                 "--no-progress", "--threads", "1"]) == 0
    assert "1 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["use_rslora"] is True
    assert main(["train", "sft", "--base", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--steps", "1"]) == 2
    assert "output folder exists" in capsys.readouterr().err


def test_multi_turn_messages_with_a_system_prompt_train_on_assistant_turns(tiny_model_dir, tmp_path):
    """OpenAI `messages` data goes through TRL as one prompt/completion example per assistant turn."""
    conversation = {"messages": [{"role": "system", "content": "You add numbers."},
                                 {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
                                 {"role": "user", "content": "and 3 + 3?"}, {"role": "assistant", "content": "6"}]}
    data = write_jsonl([conversation] * 12, tmp_path / "chats.jsonl")
    result = train_sft(small_config(tiny_model_dir, data, tmp_path / "out", steps=2, val_fraction=0.0))
    assert result.steps == 2 and (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_a_small_run_says_so_and_the_summary_is_the_mean_loss(tiny_model_dir, sft_data, tmp_path, capsys):
    config = small_config(tiny_model_dir, sft_data, tmp_path / "out", steps=0, epochs=1, batch_size=8,
                          val_fraction=0.0)
    result = train_sft(config)
    assert "make only 5 optimizer step(s)" in capsys.readouterr().err
    logged = [e["loss"] for e in result.log_history if "loss" in e]
    assert len(logged) == 5 and result.train_loss == pytest.approx(sum(logged) / len(logged), rel=1e-3)


def test_resume_with_only_out_takes_the_interrupted_run_s_settings(tiny_model_dir, sft_data, tmp_path, capsys):
    full = tmp_path / "full"
    train_sft(small_config(tiny_model_dir, sft_data, full, lora_r=8))
    # an interrupted run of OUT: its work folder holds checkpoint-3 and the run's settings
    checkpoints = tmp_path / "out.partial" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-3", checkpoints / "checkpoint-3")
    for name in ("run_config.json", "options.json"):
        shutil.copy(full / "checkpoints" / name, checkpoints / name)
    (checkpoints / "options.json").write_text((checkpoints / "options.json").read_text().replace(str(full),
                                                                                                 str(tmp_path / "out")))
    capsys.readouterr()
    resumed = train_sft(TrainConfig(out=str(tmp_path / "out"), resume=True))
    err = capsys.readouterr().err
    assert "resuming from" in err and "checkpoint-3" in err
    assert resumed.steps == 6 and read_adapter(tmp_path / "out").ranks() == {8}  # lora_r from the first run
    with pytest.raises(QwenlabError, match="no earlier run in"):
        train_sft(TrainConfig(out=str(tmp_path / "never"), resume=True))


def test_no_progress_silences_every_bar_log_dict_and_library_warning(tiny_model_dir, sft_data, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "qwenlab", "train", "sft", "--base", str(tiny_model_dir), "--data",
                           str(sft_data), "--out", str(tmp_path / "out"), "--steps", "2", "--no-progress",
                           "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    noise = [line for line in done.stderr.splitlines() if "%|" in line or "Warning" in line or line.startswith("{")]
    assert "mean train loss" in done.stdout and noise == [], noise
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses_logged = [r for r in rows if "loss" in r]
    assert losses_logged and all(isinstance(r["loss"], float) and r["step"] >= 1 for r in losses_logged)
    assert any("train_loss" in r for r in rows)  # the run's summary is logged last


def test_ctrl_c_checkpoints_the_steps_done_and_the_printed_command_resumes(tiny_model_dir, sft_data, tmp_path,
                                                                          monkeypatch, capsys):
    """Ctrl-C arrives as KeyboardInterrupt in the training loop: here, in the third training step."""
    from transformers import Trainer

    real_step, calls = Trainer.training_step, []

    def interrupted_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", interrupted_step)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train_sft(small_config(tiny_model_dir, sft_data, out, save_steps=100, val_fraction=0.0))
    err = capsys.readouterr().err
    assert f"interrupted at step 2 (checkpoint-2 saved); resume with: qwenlab train sft --out {out} --resume" in err
    assert (tmp_path / "out.partial" / "checkpoints" / "checkpoint-2" / "optimizer.pt").is_file()
    monkeypatch.setattr(Trainer, "training_step", real_step)
    assert main(["train", "sft", "--out", str(out), "--resume", "--no-progress"]) == 0  # the printed command
    assert read_adapter(out).ranks() == {4} and "checkpoint-2" in capsys.readouterr().err
