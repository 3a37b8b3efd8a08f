"""Write a Hugging Face checkpoint folder atomically, streaming tensors into size-capped shards.

Everything goes to a temporary sibling folder first; only a complete folder is renamed into
place, so an interrupted write never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwenlab.checkpoint.reader import INDEX_FILE, SINGLE_FILE
from qwenlab.errors import QwenlabError

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "b": 1}
    s = str(text).strip().lower()
    for unit, factor in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise QwenlabError(f"invalid size '{text}': expected e.g. 2GB, 500MB or a byte count") from None


def prepare_output_dir(out: str | Path, force: bool = False) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise QwenlabError(f"{out}: output folder exists (use --force to replace it)")
    return out


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


class CheckpointWriter:
    """Use as a context manager: `add` tensors one at a time, then leave the block to commit.

    with CheckpointWriter(out, config_dict) as w:
        for name, tensor in ...: w.add(name, tensor)
    """

    def __init__(self, out: str | Path, config: dict, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 generation_config: dict | None = None, force: bool = False):
        self.out = prepare_output_dir(out, force)
        self.config = config
        self.generation_config = generation_config
        self.max_shard_bytes = max(1, int(max_shard_bytes))
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0
        self._names: set[str] = set()

    def __enter__(self) -> "CheckpointWriter":
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise QwenlabError(f"tensor '{name}' written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # A private contiguous copy: safetensors refuses views and shared storage.
        self._buffer[name] = tensor.detach().to("cpu").contiguous().clone()
        self._buffer_bytes += nbytes
        self._total_bytes += nbytes

    def path_in_output(self, relative: str) -> Path:
        """Where to put an extra file (tokenizer, lineage) inside the folder being written."""
        return self.tmp / relative

    def _flush(self) -> None:
        if not self._buffer:
            return
        index = len(self._shards)
        save_file(self._buffer, str(self.tmp / f"shard-{index}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def _commit(self) -> None:
        self._flush()
        n = len(self._shards)
        if n == 0:
            raise QwenlabError("no tensors to write")
        if n == 1:
            (self.tmp / "shard-0.tmp").rename(self.tmp / SINGLE_FILE)
        else:
            weight_map = {}
            for i, names in enumerate(self._shards):
                shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                (self.tmp / f"shard-{i}.tmp").rename(self.tmp / shard)
                weight_map.update({name: shard for name in names})
            write_json(self.tmp / INDEX_FILE, {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map})
        write_json(self.tmp / "config.json", self.config)
        if self.generation_config:
            write_json(self.tmp / "generation_config.json", self.generation_config)
        if self.out.exists():
            shutil.rmtree(self.out) if self.out.is_dir() else self.out.unlink()
        self.tmp.rename(self.out)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._commit()
                return
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        shutil.rmtree(self.tmp, ignore_errors=True)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied
