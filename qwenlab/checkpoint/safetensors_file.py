"""One safetensors file, validated before use and read lazily through a memory map.

safetensors' own errors on a truncated file come from deep inside Rust; we check the header
against the file size first so the user gets one line naming the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from qwenlab.checkpoint.dtypes import element_bytes
from qwenlab.errors import QwenlabError

_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: Path) -> dict[str, dict]:
    """Parse and check a safetensors header: returns {name: {dtype, shape, data_offsets}}."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise QwenlabError(f"{path}: truncated or not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise QwenlabError(f"{path}: corrupt safetensors header (declared length {header_len}, "
                               f"file size {size}); is it truncated or a pickle file?")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise QwenlabError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise QwenlabError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= d
            expected = numel * element_bytes(info["dtype"])
            # Negative sizes or offsets would pass the byte count below (e.g. shape [-1] over end < start)
            # and reach the readers as a negative length.
            if not (_natural(start) and _natural(end) and start <= end and all(_natural(d) for d in info["shape"])):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise QwenlabError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        if end > data_len:
            raise QwenlabError(f"{path}: truncated: tensor '{name}' ends at byte {end} of a "
                               f"{data_len}-byte data section")
        if end - start != expected:
            raise QwenlabError(f"{path}: corrupt entry for tensor '{name}': {end - start} bytes for "
                               f"shape {info['shape']} {info['dtype']} (expected {expected})")
    return header


class SafetensorsFile:
    """A memory-mapped safetensors file; `get` materialises one tensor on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header = read_header(self.path)
        self._handle = None

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype_name(self, name: str) -> str:
        return self.header[name]["dtype"]

    def get(self, name: str) -> torch.Tensor:
        if self._handle is None:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        return self._handle.get_tensor(name)
