"""nano: the tiny Qwen2-architecture chat model shipped inside the package."""

from pathlib import Path

from qwenlab.errors import QwenlabError

WEIGHTS_DIR = Path(__file__).parent / "weights"


def nano_path() -> Path:
    """The folder of the shipped nano model (a normal Hugging Face Qwen2 folder)."""
    if not (WEIGHTS_DIR / "config.json").is_file():
        raise QwenlabError(f"{WEIGHTS_DIR}: the nano model is not built; run `python -m qwenlab.nano.train`")
    return WEIGHTS_DIR
