"""Handing freed heap pages back to the OS (model loading, between generations)."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    # find_library runs ldconfig/gcc in a subprocess: once per process, not per call.
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None  # not glibc


def release_free_memory() -> None:
    """glibc keeps freed heap pages mapped; malloc_trim hands them back, so RSS stays the model's size.

    Called after each repacked chunk and layer while loading: the chunks' temporaries are freed, but
    without a trim their pages stay resident and add up to the load's peak (measured on the 1.5B int4
    shape: peak 1.40 GB without, 1.34 GB with a trim per layer).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
