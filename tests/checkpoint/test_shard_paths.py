"""Weight files stay inside the model folder: a shard name in model.safetensors.index.json that leaves it
('../', an absolute path, a symlink to another place) is one QwenlabError naming the index and the
entry (the quantized loader's case: tests/quant/test_crafted_folders.py). Each crafted name points at a real, valid
copy of the weights, so without the check the folder would load from outside."""

import json
import os
import shutil

import pytest
import torch

from qwenlab.checkpoint import open_checkpoint
from qwenlab.errors import QwenlabError
from qwenlab.model import load_model

SHARD = "model-00001-of-00001.safetensors"


def sharded_copy(source, folder, shard_name: str):
    """A copy of `source` whose index sends every tensor to `shard_name` (the weights are not copied)."""
    folder.mkdir(parents=True)
    for path in source.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, folder / path.name)
    names = open_checkpoint(source, validate=False).tensor_names()
    index = {"metadata": {}, "weight_map": {name: shard_name for name in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def refused(folder, entry: str, why: str) -> str:
    with pytest.raises(QwenlabError) as error:
        open_checkpoint(folder)
    message = str(error.value)
    assert message.startswith(str(folder / "model.safetensors.index.json") + f": shard {entry!r}"), message
    assert why in message and "\n" not in message
    return message


def test_a_parent_folder_shard_is_refused(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir / "model.safetensors", tmp_path / "outside.safetensors")
    folder = sharded_copy(tiny_model_dir, tmp_path / "m", "../outside.safetensors")
    refused(folder, "../outside.safetensors", "is not a file name in the model folder")
    deep = sharded_copy(tiny_model_dir, tmp_path / "deep", "../../etc/passwd")
    refused(deep, "../../etc/passwd", "is not a file name in the model folder")


def test_an_absolute_shard_is_refused(tiny_model_dir, tmp_path):
    target = tmp_path / "elsewhere" / "weights.safetensors"
    target.parent.mkdir()
    shutil.copy(tiny_model_dir / "model.safetensors", target)
    folder = sharded_copy(tiny_model_dir, tmp_path / "m", str(target))
    refused(folder, str(target), "is not a file name in the model folder")


def test_a_symlink_out_of_the_folder_is_refused_and_one_inside_is_read(tiny_model_dir, tmp_path):
    target = tmp_path / "elsewhere.safetensors"
    shutil.copy(tiny_model_dir / "model.safetensors", target)
    folder = sharded_copy(tiny_model_dir, tmp_path / "m", SHARD)
    (folder / SHARD).symlink_to(target)
    refused(folder, SHARD, "leads outside the model folder")
    # the same link to a file inside the folder is fine
    (folder / SHARD).unlink()
    shutil.copy(tiny_model_dir / "model.safetensors", folder / "real.safetensors")
    (folder / SHARD).symlink_to("real.safetensors")
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(load_model(folder)(tokens), load_model(tiny_model_dir)(tokens))


def test_a_single_file_symlinked_out_of_the_folder_is_refused(tiny_model_dir, tmp_path):
    target = tmp_path / "elsewhere.safetensors"
    shutil.copy(tiny_model_dir / "model.safetensors", target)
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(target)
    with pytest.raises(QwenlabError, match=r"model\.safetensors leads outside the model folder"):
        open_checkpoint(folder)


def test_a_hugging_face_hub_snapshot_reads_its_blobs(tiny_model_dir, tmp_path):
    """The hub cache keeps files in <repo>/blobs/ and links them from <repo>/snapshots/<rev>/: allowed."""
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for path in tiny_model_dir.iterdir():
        shutil.copy(path, blobs / f"blob-{path.name}")
        (snapshot / path.name).symlink_to(os.path.relpath(blobs / f"blob-{path.name}", snapshot))
    assert open_checkpoint(snapshot).shape("model.norm.weight") == (48,)
    # but not a link from the snapshot to anywhere else
    (tmp_path / "other").mkdir()
    shutil.copy(tiny_model_dir / "model.safetensors", tmp_path / "other" / "w.safetensors")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(tmp_path / "other" / "w.safetensors")
    with pytest.raises(QwenlabError, match="leads outside the model folder"):
        open_checkpoint(snapshot)


def test_an_index_whose_map_is_not_names_is_one_error(tiny_model_dir, tmp_path):
    folder = sharded_copy(tiny_model_dir, tmp_path / "m", SHARD)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": 7}}))
    with pytest.raises(QwenlabError, match="missing 'weight_map'"):
        open_checkpoint(folder)
