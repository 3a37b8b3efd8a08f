"""Evaluation files (JSONL or plain text) read with errors that name the file, and file:line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from qwenlab.errors import QwenlabError


def read_text_file(path: Path) -> str:
    """The UTF-8 text of an existing file; a missing path, a folder or binary data is a user error."""
    if path.is_dir():
        raise QwenlabError(f"{path}: expected a file, found a folder")
    if not path.is_file():
        raise QwenlabError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QwenlabError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a file."""
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise QwenlabError(f"{path}:{number}: invalid JSON ({e.msg})") from None
