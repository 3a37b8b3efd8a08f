"""nano: the tiny Qwen2-architecture chat model shipped inside the package."""

from pathlib import Path

from qwenlab.checkpoint.reader import NANO_DIR, resolve_model_path

WEIGHTS_DIR = NANO_DIR  # where train.py writes the model


def nano_path() -> Path:
    """The folder of the shipped nano model (a normal Hugging Face Qwen2 folder)."""
    return resolve_model_path("nano")
