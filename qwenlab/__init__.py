"""qwenlab: a CPU-first lab for the Qwen2.5 small-model family.

    import qwenlab
    model, tokenizer, checkpoint = qwenlab.load("nano")   # any folder: float, quantized, or an adapter
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # qwenlab.load and qwenlab.Loaded without importing torch on `import qwenlab`
    if name in ("load", "Loaded"):
        from qwenlab import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'qwenlab' has no attribute {name!r}")
