"""qwenlab's one cache root: $QWENLAB_HOME, else ~/.cache/qwenlab. Compiled kernels (kernels/),
measurements (measurements/), benchmark variants and the set-up's llama.cpp wheels (wheels/) live under it."""

from __future__ import annotations

import os
from pathlib import Path


def qwenlab_home() -> Path:
    return Path(os.environ.get("QWENLAB_HOME") or Path.home() / ".cache" / "qwenlab")
