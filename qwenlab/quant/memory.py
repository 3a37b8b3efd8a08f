"""Handing freed heap pages back to the OS while a quantized model is built."""

from __future__ import annotations

import ctypes
import ctypes.util


def release_free_memory() -> None:
    """glibc keeps freed heap pages mapped; malloc_trim hands them back, so RSS stays the model's size.

    Called after each repacked chunk and layer while loading: the chunks' temporaries are freed, but
    without a trim their pages stay resident and add up to the load's peak (measured on the 1.5B int4
    shape: peak 1.40 GB without, 1.34 GB with a trim per layer).
    """
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc
