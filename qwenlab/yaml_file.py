"""One YAML reader for every config a user writes (merge, merge-search, training, recipes)."""

from __future__ import annotations

from pathlib import Path

import yaml

from qwenlab.errors import QwenlabError


def read_yaml(path: str | Path, what: str = "YAML file"):
    """The parsed file; a folder, a missing file, non-UTF-8 bytes or bad YAML is one line naming the file."""
    path = Path(path)
    if path.is_dir():
        raise QwenlabError(f"{path}: expected a {what}, found a folder")
    if not path.is_file():
        raise QwenlabError(f"{path}: no such {what}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise QwenlabError(f"{path}: not UTF-8 text ({e.reason})") from None
    except yaml.YAMLError as e:
        raise QwenlabError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
