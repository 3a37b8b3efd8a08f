"""Outputs: nothing outside the target is ever deleted or half-written.

--force replaces only the output itself and refuses an output that is, or holds, an input; an
interrupted write (Ctrl-C: KeyboardInterrupt raised while tensors are read) leaves the old output
as it was and no temporary folder behind. Checked on the writer and on every command that writes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from qwenlab.checkpoint import CheckpointWriter
from qwenlab.checkpoint.reader import Checkpoint
from qwenlab.checkpoint.writer import atomic_folder, prepare_output_dir
from qwenlab.errors import QwenlabError
from tests.conftest import build_hf_model
from tests.quant.conftest import TINY32


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256): equal snapshots mean nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary siblings (.NAME.tmp-PID, .NAME.old-PID) anywhere under `folder`."""
    return [str(p) for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture
def model(tmp_path) -> Path:
    folder = tmp_path / "work" / "model"
    build_hf_model(folder, **TINY32)
    return folder


def interrupt_reads_after(monkeypatch, n: int) -> None:
    """Ctrl-C while the input's tensors are being read: the n+1-th Checkpoint.get raises KeyboardInterrupt."""
    calls = {"n": 0}
    real_get = Checkpoint.get

    def get(self, name):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt
        return real_get(self, name)

    monkeypatch.setattr(Checkpoint, "get", get)


# ---- the check itself --------------------------------------------------------------------------
def test_force_refuses_an_output_that_is_or_holds_an_input(model, tmp_path):
    before = snapshot(tmp_path)
    for out in (model, model.parent, tmp_path):
        with pytest.raises(QwenlabError, match=r"output (is|holds) the input"):
            prepare_output_dir(out, True, [model])
    link = tmp_path / "link"
    link.symlink_to(model)  # the same folder under another name: caught after resolving symlinks
    with pytest.raises(QwenlabError, match="output is the input"):
        prepare_output_dir(link, True, [model])
    link.unlink()
    assert snapshot(tmp_path) == before
    assert prepare_output_dir(model / "quantized", True, [model]) == model / "quantized"  # inside an input: fine


def test_force_refuses_files_root_home_and_the_current_folder(tmp_path, monkeypatch):
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"keep")
    with pytest.raises(QwenlabError, match="is a file, not a folder"):
        prepare_output_dir(a_file, True)
    with pytest.raises(QwenlabError, match="is a folder"):
        prepare_output_dir(tmp_path, True, kind="file")
    work = tmp_path / "cwd" / "inner"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for out, what in (("/", "expected an output folder name"), (Path.home(), "home folder"),
                      (work, "current folder"), (work.parent, "current folder"), ("..", "expected an output")):
        with pytest.raises(QwenlabError, match=what):
            prepare_output_dir(out, True)
    assert a_file.read_bytes() == b"keep" and work.is_dir()


def test_interrupted_forced_write_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    with CheckpointWriter(out, {"x": 1}) as writer:
        writer.add("a", torch.ones(2))
    old = snapshot(out)

    def tensors():
        yield "a", torch.zeros(2)
        raise KeyboardInterrupt  # Ctrl-C in the middle of the tensor stream

    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(out, {"x": 2}, force=True) as writer:
            for name, tensor in tensors():
                writer.add(name, tensor)
    assert snapshot(out) == old and leftovers(tmp_path) == []
    with CheckpointWriter(out, {"x": 3}, force=True) as writer:
        writer.add("b", torch.ones(3))
        assert snapshot(out) == old  # the old output stands until the new one is complete
    assert snapshot(out) != old and leftovers(tmp_path) == []


def test_forced_write_replaces_a_symlinked_output_not_its_target(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("keep")
    link = tmp_path / "out"
    link.symlink_to(target)
    with atomic_folder(link, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not link.is_symlink() and (link / "new.txt").is_file()
    assert (target / "precious.txt").read_text() == "keep"


# ---- every command that writes ------------------------------------------------------------------
def test_quantize_refuses_its_input_and_an_interrupted_run_keeps_the_old_output(model, tmp_path, monkeypatch):
    from qwenlab.quant import quantize_model

    inputs = snapshot(tmp_path)
    for out in (model, model.parent):
        with pytest.raises(QwenlabError, match=r"output (is|holds) the input"):
            quantize_model(model, out, bits=8, force=True, progress=False)
    assert snapshot(tmp_path) == inputs
    out = tmp_path / "int8"
    quantize_model(model, out, bits=8, progress=False)
    assert (out / "lineage.json").is_file()  # written inside the folder before it is renamed into place
    old = snapshot(out)
    interrupt_reads_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, out, bits=4, group_size=32, force=True, progress=False)
    assert snapshot(out) == old and leftovers(tmp_path) == []


def test_merge_refuses_an_output_holding_an_input(model, tmp_path):
    from qwenlab.merge import merge

    before = snapshot(tmp_path)
    config = {"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 1.0}}]}
    with pytest.raises(QwenlabError, match="output holds the input"):
        merge(config, model.parent, force=True, progress=False)
    assert snapshot(tmp_path) == before


def test_adapter_commands_refuse_their_inputs(model, tmp_path):
    from qwenlab.adapters.adapted_checkpoint import merge_adapter_into_folder
    from qwenlab.adapters.combine import combine_adapters_to_folder
    from qwenlab.adapters.extract import extract_adapter_to_folder
    from tests.adapters.conftest import make_peft_adapter

    adapter = tmp_path / "work" / "adapter"
    make_peft_adapter(model, adapter)
    before = snapshot(tmp_path)
    with pytest.raises(QwenlabError, match="output is the input"):
        merge_adapter_into_folder(model, adapter, adapter, force=True, progress=False)
    with pytest.raises(QwenlabError, match="output holds the input"):
        merge_adapter_into_folder(model, adapter, adapter.parent, force=True, progress=False)
    merged = tmp_path / "merged"
    merge_adapter_into_folder(model, adapter, merged, progress=False)
    before = snapshot(tmp_path)
    with pytest.raises(QwenlabError, match="output holds the input"):
        extract_adapter_to_folder(model, merged, tmp_path, 2, force=True, progress=False)
    with pytest.raises(QwenlabError, match="output is the input"):
        combine_adapters_to_folder([adapter, adapter], adapter, force=True)
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


def test_gguf_export_refuses_its_input_and_an_interrupted_export_keeps_the_old_file(model, tmp_path, monkeypatch):
    from qwenlab.quant.gguf_export import export_gguf

    with pytest.raises(QwenlabError, match="output is the input"):
        export_gguf(model, model, "f16", force=True)
    out = tmp_path / "model.gguf"
    export_gguf(model, out, "f16")
    old = hashlib.sha256(out.read_bytes()).hexdigest()
    interrupt_reads_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(model, out, "q8_0", force=True)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == old
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_training_refuses_data_inside_its_output_and_an_interrupted_forced_run_keeps_the_old_one(
        tiny_model_dir, tmp_path, monkeypatch):
    import qwenlab.train.trainers as trainers
    from qwenlab.train import TrainConfig, train_sft
    from qwenlab.train.data import sft_records_from_task, write_jsonl

    out = tmp_path / "run"
    data = write_jsonl(sft_records_from_task("arithmetic", 12, seed=1), out / "data.jsonl")
    config = dict(base=str(tiny_model_dir), data=str(data), out=str(out), steps=2, batch_size=4, lora_r=2,
                  lora_alpha=4, val_fraction=0.0, progress=False, threads=1, force=True)
    before = snapshot(out)
    with pytest.raises(QwenlabError, match="output holds the input"):
        train_sft(TrainConfig(**config))
    assert snapshot(out) == before
    # a finished run, then a forced new one that is interrupted at the very end
    elsewhere = tmp_path / "data.jsonl"
    elsewhere.write_bytes(data.read_bytes())
    config.update(data=str(elsewhere))
    train_sft(TrainConfig(**config))
    old = snapshot(out)
    assert "adapter_config.json" in old and not (tmp_path / "run.partial").exists()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainers, "finish_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_sft(TrainConfig(**{**config, "seed": 5}))
    assert snapshot(out) == old  # the old run stands; the new one waits, resumable, in run.partial
    assert (tmp_path / "run.partial" / "checkpoints" / "checkpoint-2").is_dir()
    monkeypatch.undo()
    result = train_sft(TrainConfig(**{**config, "seed": 5, "force": False, "resume": True}))
    assert result.out == out and snapshot(out) != old and not (tmp_path / "run.partial").exists()
    assert (out / "adapter_config.json").is_file() and leftovers(tmp_path) == []
