"""Write a Hugging Face checkpoint folder atomically, streaming tensors into size-capped shards.

Everything goes to a temporary sibling folder first; only a complete folder is renamed into
place, so an interrupted write never leaves a half-written model behind.

Every command that writes an output (merge, quantize, adapter ops, train, GGUF export) checks it
with `prepare_output_dir` first and swaps it in with `replace_output`: `--force` replaces only the
output itself, never an input, a folder that holds an input, `/`, the home folder or the current
folder, and the old output is removed only once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwenlab.checkpoint.reader import INDEX_FILE, SINGLE_FILE
from qwenlab.errors import QwenlabError

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with the file mode every other file gets (0666 less the umask): save_file
    writes 0600, which kept weights from being served by another user or container."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


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


def _real(path: str | Path) -> Path:
    """The absolute path with every symlink resolved (also for a path that does not exist yet)."""
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _holds(folder: Path, path: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling symlink is still something to replace


def prepare_output_dir(out: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = (), *,
                       kind: str = "folder") -> Path:
    """Check that OUT may be written (or, with force, replaced) before any work; returns it as a Path.

    Refused, with or without force: an output that is, or holds, one of `inputs` (after resolving
    symlinks: replacing it would delete the input); an existing output of the wrong kind (a file
    where a folder is written, or the reverse); and `/`, the home folder, the current folder or any
    folder holding one of them. kind: "folder" or "file".
    """
    out = Path(out)
    what = "folder" if kind == "folder" else "file"
    if out.name in ("", ".", ".."):
        raise QwenlabError(f"{str(out) or repr('')}: expected an output {what} name, not the current or a parent folder")
    real = _real(out)
    for item in inputs:
        if item is not None and _holds(real, _real(item)):
            relation = "is" if _real(item) == real else "holds"
            raise QwenlabError(f"{out}: the output {relation} the input {item}; write to another {what}")
    if not _exists(out):
        return out
    if not force:
        raise QwenlabError(f"{out}: output {what} exists (use --force to replace it)")
    if kind == "folder" and out.exists() and not out.is_dir():
        raise QwenlabError(f"{out}: exists and is a file, not a folder; --force replaces only an output folder")
    if kind == "file" and out.is_dir():
        raise QwenlabError(f"{out}: exists and is a folder; --force replaces only an output file")
    for name, protected in (("the root folder", Path("/")), ("your home folder", Path.home()),
                            ("the current folder", Path.cwd())):
        if _holds(real, _real(protected)):
            raise QwenlabError(f"{out}: --force would replace {name} ({protected}); choose another output {what}")
    return out


def temp_sibling(out: Path, tag: str = "tmp") -> Path:
    """A hidden sibling of `out` for this process: `.NAME.tmp-PID` (same filesystem, so renames are atomic)."""
    return out.parent / f".{out.name}.{tag}-{os.getpid()}"


def make_temp_folder(tmp: Path, out: Path) -> None:
    """Create the temporary sibling; a failure names the output the user gave, not the hidden folder."""
    remove_path(tmp)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise QwenlabError(f"{out}: cannot write the output here ({e.strerror or e})") from None


def remove_path(path: Path) -> None:
    """Remove a file, a symlink (never what it points to) or a folder."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def replace_output(tmp: Path, out: Path) -> None:
    """Move the complete `tmp` to `out`. An old `out` is first set aside and removed only after the
    new one is in place, so an interruption leaves the old output or the new one, never a mix."""
    if not _exists(out):
        os.rename(tmp, out)
        return
    if out.is_file() and not out.is_symlink():
        os.replace(tmp, out)  # a file: one atomic step
        return
    old = temp_sibling(out, "old")
    remove_path(old)
    os.rename(out, old)  # renames a symlink itself, never its target
    os.rename(tmp, out)
    remove_path(old)


@contextmanager
def atomic_folder(out: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; when the block completes it replaces `out`, and if
    the block raises (an error, Ctrl-C) it is removed and `out` is left as it was."""
    out = prepare_output_dir(out, force, inputs)
    tmp = temp_sibling(out)
    make_temp_folder(tmp, out)
    try:
        yield tmp
        replace_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small file through a temporary sibling, so a reader never sees it half-written."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


class CheckpointWriter:
    """Use as a context manager: `add` tensors one at a time, then leave the block to commit.

    with CheckpointWriter(out, config_dict) as w:
        for name, tensor in ...: w.add(name, tensor)
    """

    def __init__(self, out: str | Path, config: dict, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 generation_config: dict | None = None, force: bool = False,
                 inputs: Iterable[str | Path | None] = ()):
        self.inputs = tuple(inputs)
        self.force = force
        self.out = prepare_output_dir(out, force, self.inputs)
        self.config = config
        self.generation_config = generation_config
        self.max_shard_bytes = max(1, int(max_shard_bytes))
        self.tmp = temp_sibling(self.out)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0
        self._names: set[str] = set()

    def __enter__(self) -> "CheckpointWriter":
        make_temp_folder(self.tmp, self.out)
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
        save_safetensors(self._buffer, self.tmp / f"shard-{index}.tmp")
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
        prepare_output_dir(self.out, self.force, self.inputs)  # again: something may have appeared meanwhile
        replace_output(self.tmp, self.out)

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
