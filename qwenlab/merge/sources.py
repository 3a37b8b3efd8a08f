"""Merge inputs: anything with a Checkpoint's interface (`path`, `config`, `generation_config`,
`tensor_names`, `shape`, `get`). A config may name `BASE+ADAPTER` (mergekit's "model+lora"
syntax): the base with a PEFT LoRA adapter applied on the fly, tensor by tensor, in float32,
without writing the full model.

Checkpoint folders are memory-mapped here (zero-copy reads), and a tensor's pages are dropped
from the process after use (`release`, or the next read from that file): mapped pages otherwise
stay resident, and a streaming merge would show every input's full size as its peak memory.
Dropping is safe on a file mapping: a later access reads the same bytes again.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Protocol

import torch

from qwenlab.adapters.adapted_checkpoint import AdaptedCheckpoint
from qwenlab.checkpoint import Checkpoint, open_checkpoint
from qwenlab.checkpoint.dtypes import torch_dtype
from qwenlab.checkpoint.reader import resolve_model_path, weight_files
from qwenlab.checkpoint.safetensors_file import read_header
from qwenlab.errors import QwenlabError
from qwenlab.checkpoint.config import Qwen2Config

FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")  # what merges read


class TensorSource(Protocol):
    path: Path
    config: Qwen2Config
    generation_config: dict

    def tensor_names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> torch.Tensor: ...


class _MappedFile:
    """One safetensors file mapped copy-on-write (writable for torch, never written back)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (header_bytes,) = struct.unpack("<Q", f.read(8))
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.data_start = 8 + header_bytes
        self.header = read_header(path)
        self.last_range: tuple[int, int] | None = None

    def tensor(self, name: str) -> torch.Tensor:
        info = self.header[name]
        dtype = torch_dtype(info["dtype"]) if info["dtype"] in FLOAT_DTYPES else None
        if dtype is None:
            raise QwenlabError(f"{self.path}: tensor '{name}' has dtype {info['dtype']}; only float tensors merge")
        start, end = (self.data_start + offset for offset in info["data_offsets"])
        self.release()
        self.last_range = (start, end)
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(self.map, dtype=dtype, count=count, offset=start).reshape(info["shape"])

    def release(self) -> None:
        """Drop the pages of the tensor read last from the resident set (the page cache keeps them)."""
        if self.last_range is None:
            return
        start, end = self.last_range
        aligned = start - start % mmap.PAGESIZE
        self.map.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)
        self.last_range = None


class MappedCheckpoint:
    """A validated Checkpoint read through our own mappings, so used pages can be released."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.path = checkpoint.path
        self.config, self.config_dict = checkpoint.config, checkpoint.config_dict
        self.generation_config = checkpoint.generation_config
        self._files = {file.name: _MappedFile(file) for file in self._shard_files()}
        self._where = {name: file for file in self._files.values() for name in file.header}

    def _shard_files(self) -> list[Path]:
        return weight_files(self.path)  # the reader's own list: each shard checked to lie inside the folder

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.checkpoint.shape(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            return self.checkpoint.get(name)  # raises the checkpoint's own "not found" error
        return self._where[name].tensor(name)

    def release(self) -> None:
        """Drop the pages of the tensors read so far from the resident set."""
        for file in self._files.values():
            file.release()


class AdaptedSource(AdaptedCheckpoint):
    """AdaptedCheckpoint over a memory-mapped base, as a merge input: an adapted weight comes back
    in float32 (W + scaling·B@A before any cast; the merge computes in float32), every other tensor
    as the base stores it."""

    def __init__(self, base: MappedCheckpoint, adapter_dir: str | Path):
        super().__init__(base, adapter_dir)
        self.adapter_path = Path(adapter_dir)  # recorded in the merge's lineage next to the base

    def get(self, name: str) -> torch.Tensor:
        return self.get_fp32(name) if name in self._adapted else self.base.get(name)

    def release(self) -> None:
        self.base.release()


def split_adapter_reference(name: str) -> tuple[str, str] | None:
    """'BASE+ADAPTER' -> (BASE, ADAPTER) when it is not itself an existing path; else None."""
    text = str(name)
    if "+" not in text or Path(text).exists():
        return None
    base, adapter = text.rsplit("+", 1)
    return base, adapter


def open_model_source(path: str | Path) -> MappedCheckpoint | AdaptedSource:
    """The default way a merge opens a model named in the config (a folder, 'nano', or BASE+ADAPTER)."""
    parts = split_adapter_reference(str(path))
    if parts is None:
        return MappedCheckpoint(open_checkpoint(path))
    base, adapter = parts
    adapter = resolve_model_path(adapter)  # a folder or a hub id
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise QwenlabError(f"model '{path}': '{adapter}' is not a LoRA adapter folder (no adapter_config.json); "
                           "write BASE+ADAPTER_FOLDER")
    return AdaptedSource(MappedCheckpoint(open_checkpoint(base)), adapter)
