"""qwenlab: a CPU-first lab for the Qwen2.5 small-model family."""

__version__ = "0.1.0"
