"""Read stored tensors with plain file reads, whole or a range of rows at a time.

A memory-mapped read (what safetensors' safe_open does) leaves every page it touched counted in the
process's resident memory until the file is closed, so a quantized model loaded through it peaks at
about twice its size. Reading into fresh buffers keeps the file in the page cache instead, and
reading rows in chunks bounds the temporaries of repacking the 151936-row embedding.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from qwenlab.checkpoint.dtypes import torch_dtype
from qwenlab.checkpoint.reader import weight_files
from qwenlab.checkpoint.safetensors_file import read_header
from qwenlab.errors import QwenlabError

STORED_DTYPES = ("F32", "F16", "BF16", "I8", "U8", "I32", "I64")  # what a quantized folder may hold


class StoredTensors:
    def __init__(self, folder: str | Path):
        self.where: dict[str, tuple[Path, int, dict]] = {}
        # weight_files: the shard names of the index are checked to stay inside the folder
        for path in weight_files(Path(folder)):
            header = read_header(path)  # validated: offsets inside the file, sizes match shapes
            with open(path, "rb") as f:
                data_start = 8 + struct.unpack("<Q", f.read(8))[0]
            for tensor, info in header.items():
                self.where[tensor] = (path, data_start, info)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name][2]["shape"])

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype ('I8', 'F16', ...) from the header."""
        return self.where[name][2]["dtype"]

    def file(self, name: str) -> Path:
        return self.where[name][0]

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor, or rows [start, stop) of it, in a new buffer."""
        if name not in self.where:
            raise QwenlabError(f"tensor '{name}' not found")
        path, data_start, info = self.where[name]
        if info["dtype"] not in STORED_DTYPES:
            raise QwenlabError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        dtype, shape = torch_dtype(info["dtype"]), list(info["shape"])
        rows = shape[0] if shape else 1
        start, stop = (0 if start is None else start), (rows if stop is None else min(stop, rows))
        row_bytes = (info["data_offsets"][1] - info["data_offsets"][0]) // max(rows, 1)
        out = torch.empty([stop - start, *shape[1:]] if shape else [], dtype=dtype)
        with open(path, "rb") as f:
            f.seek(data_start + info["data_offsets"][0] + start * row_bytes)
            if f.readinto(out.view(-1).view(torch.uint8).numpy()) != (stop - start) * row_bytes:
                raise QwenlabError(f"{path}: truncated while reading '{name}'")
        return out
