"""Read a Hugging Face Qwen2 folder lazily: config, generation config, and tensors on demand.

Tensors come from model.safetensors or from sharded files listed in
model.safetensors.index.json, memory-mapped and materialised one at a time. Pickle
checkpoints (.bin/.pt) are refused: unpickling an untrusted file can run arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwenlab.checkpoint.dtypes import FLOAT_NAMES
from qwenlab.checkpoint.hub import hub_snapshot, parse_hub_id
from qwenlab.checkpoint.names import expected_tensor_shapes
from qwenlab.checkpoint.safetensors_file import SafetensorsFile
from qwenlab.errors import QwenlabError
from qwenlab.checkpoint.config import Qwen2Config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = FLOAT_NAMES  # what a float checkpoint's tensors may be stored as


# The shipped nano model's folder: package data, named here so that loading never imports qwenlab.nano
# (nano depends on the library, not the reverse).
NANO_DIR = Path(__file__).resolve().parents[1] / "nano" / "weights"


def resolve_model_path(model: str | Path) -> Path:
    """A model or adapter reference as a folder: 'nano' names the shipped model; an existing path is itself;
    `org/name[@rev]` that is no local path is a hub id, resolved through the Hugging Face cache (hub.py)."""
    if str(model) == "nano":
        if not (NANO_DIR / "config.json").is_file():
            raise QwenlabError(f"{NANO_DIR}: the nano model is not built; run `python -m qwenlab.nano.train`")
        return NANO_DIR
    path = Path(model).expanduser()
    if not path.exists() and not isinstance(model, Path) and parse_hub_id(str(model)):
        return hub_snapshot(str(model))
    if not path.exists():
        raise QwenlabError(f"{path}: no such model folder")
    if not path.is_dir():
        raise QwenlabError(f"{path}: expected a model folder (with config.json and *.safetensors)")
    return path


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; one-line errors naming the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QwenlabError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise QwenlabError(f"{path}: expected a JSON object")
    return data


def read_weight_map(folder: Path) -> dict[str, str] | None:
    """The index's tensor -> shard map, or None for a single-file checkpoint."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return None
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise QwenlabError(f"{index}: missing 'weight_map' (an object of tensor name -> shard file name)")
    return weight_map


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, each checked to lie inside it.

    Shard names come from model.safetensors.index.json, a file anyone can craft: a name such as
    '../../etc/passwd', an absolute path or a symlink leading out of the folder would make the loader
    open (and report on) a file the user never pointed at.
    """
    weight_map = read_weight_map(folder)
    if weight_map is not None:
        index = folder / INDEX_FILE
        shard_names = sorted(set(weight_map.values()))
        paths = [inside_model_folder(folder, name, f"{index}: shard {name!r}") for name in shard_names]
        missing = [name for name, path in zip(shard_names, paths) if not path.is_file()]
        if missing:
            raise QwenlabError(f"{index}: shard file(s) missing: {', '.join(missing)}")
        return paths
    if (folder / SINGLE_FILE).is_file():
        return [inside_model_folder(folder, SINGLE_FILE, f"{folder / SINGLE_FILE}")]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        raise QwenlabError(f"{folder}: sharded safetensors without {INDEX_FILE}")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise QwenlabError(f"{folder}: found pickle checkpoint {pickles[0]}; qwenlab loads safetensors "
                           "only (pickle files can run code). Convert it with a trusted tool first.")
    raise QwenlabError(f"{folder}: no model.safetensors or {INDEX_FILE}")


def inside_model_folder(folder: Path, name: str, what: str) -> Path:
    """folder / name, refused unless `name` is a plain file name whose target (symlinks resolved) stays
    in the folder. One exception: a Hugging Face hub snapshot (<repo>/snapshots/<rev>/) holds symlinks
    into <repo>/blobs/, which is where the hub stores the files themselves."""
    if not name or name in (".", "..") or "\0" in name or "/" in name or "\\" in name or Path(name).is_absolute():
        raise QwenlabError(f"{what} is not a file name in the model folder (no folders, '..' or absolute paths)")
    try:
        root, target = folder.resolve(), (folder / name).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise QwenlabError(f"{what} cannot be resolved (a symlink loop?)") from None
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(target.is_relative_to(place) for place in allowed):
        raise QwenlabError(f"{what} leads outside the model folder (a symlink to another place)")
    return folder / name


class Checkpoint:
    """A Qwen2 checkpoint folder. Nothing but the headers is read until `get` is called."""

    def __init__(self, path: str | Path):
        self.path = resolve_model_path(path)
        self.config_dict = read_json_object(self.path / "config.json") if (self.path / "config.json").is_file() else None
        if self.config_dict is None:
            raise QwenlabError(f"{self.path / 'config.json'}: missing config.json")
        self.config = Qwen2Config.from_dict(self.config_dict, source=str(self.path / "config.json"))
        gen = self.path / "generation_config.json"
        self.generation_config: dict = read_json_object(gen) if gen.is_file() else {}
        self._files = self._open_files()
        self._where: dict[str, SafetensorsFile] = {}
        for file in self._files:
            for name in file.names():
                self._where[name] = file

    def _open_files(self) -> list[SafetensorsFile]:
        files = [SafetensorsFile(path) for path in weight_files(self.path)]
        weight_map = read_weight_map(self.path)
        if weight_map is not None:
            for file in files:
                for name in file.names():
                    if weight_map.get(name) != file.path.name:
                        raise QwenlabError(f"{file.path}: tensor '{name}' is not listed for this shard in {INDEX_FILE}")
        return files

    # ---- tensors -------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype ('F32', 'BF16', 'I8', ...) from the header, without reading the tensor."""
        return self._file(name).dtype_name(name)

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get(name)

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._where[name]
        except KeyError:
            raise QwenlabError(f"{self.path}: tensor '{name}' not found in checkpoint") from None

    def lm_head_name(self) -> str:
        """The tensor the LM head reads: embed_tokens when the embedding is tied."""
        return "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"

    def validate(self) -> "Checkpoint":
        """Check the tensor set against the config: missing, unexpected, or mis-shaped tensors."""
        if "quantization" in self.config.extra:
            return self  # a quantized layout: qwenlab.quant.load.validate_quantized checks it when loaded
        expected = expected_tensor_shapes(self.config)
        present = set(self._where)
        missing = [n for n in expected if n not in present]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise QwenlabError(f"{self.path}: missing tensor(s) {', '.join(missing[:3])}{more}")
        allowed = set(expected) | {"lm_head.weight"}  # some writers store a tied head anyway
        unexpected = sorted(present - allowed)
        if unexpected:
            more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
            raise QwenlabError(f"{self.path}: unexpected tensor(s) {', '.join(unexpected[:3])}{more}")
        for name, shape in expected.items():
            actual = self.shape(name)
            if actual != shape:
                raise QwenlabError(f"{self._file(name).path}: tensor '{name}' has shape {list(actual)}, "
                                   f"expected {list(shape)} from config.json")
            dtype = self.dtype_name(name)
            if dtype not in FLOAT_DTYPES:  # an integer table would load as nonsense weights
                raise QwenlabError(f"{self._file(name).path}: tensor '{name}' has dtype {dtype}, "
                                   f"expected a float dtype ({', '.join(FLOAT_DTYPES)})")
        return self


def open_checkpoint(path: str | Path, validate: bool = True) -> Checkpoint:
    checkpoint = Checkpoint(path)
    return checkpoint.validate() if validate else checkpoint
