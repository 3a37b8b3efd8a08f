"""JSONL evaluation files read line by line, with errors that name file:line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from qwenlab.errors import QwenlabError


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of an existing file."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise QwenlabError(f"{path}:{number}: invalid JSON ({e.msg})") from None
