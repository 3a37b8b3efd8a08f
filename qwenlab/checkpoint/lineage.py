"""lineage.json: what a variant was made from (inputs with content hashes), how, and with what versions.

Every command that writes a model folder (train, adapter ops, merge, quantize, export) calls
`write_lineage`, so `qwenlab ls` and model cards can show base -> adapter -> merge -> quantized.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path

LINEAGE_FILE = "lineage.json"
_WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(path: str | Path) -> str:
    """sha256 over a file, or over a folder's weight files (name + bytes, in name order)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json"):
        digest.update(file.name.encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("qwenlab", "torch", "transformers", "safetensors", "tokenizers", "peft", "trl", "mergekit", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def read_lineage(folder: str | Path) -> dict | None:
    path = Path(folder) / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def make_lineage(kind: str, method: str, inputs: dict[str, str | Path], config: dict | None = None) -> dict:
    """kind: base | adapter | merge | quantized | export | trained; inputs: role -> path."""
    return {
        "kind": kind,
        "method": method,
        "inputs": [
            {"role": role, "path": str(Path(p).resolve()), "sha256": content_hash(p),
             "kind": (read_lineage(p) or {}).get("kind", "base") if Path(p).is_dir() else "file"}
            for role, p in inputs.items()
        ],
        "config": config or {},
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_lineage(folder: str | Path, lineage: dict) -> Path:
    path = Path(folder) / LINEAGE_FILE
    path.write_text(json.dumps(lineage, indent=2, default=str) + "\n")
    return path
