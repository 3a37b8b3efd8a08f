"""Keep freed memory in the process during a merge, so large buffers are reused instead of re-faulted.

glibc returns every allocation above 128 KiB to the kernel when it is freed; a merge allocates
and frees buffers of the same few sizes (up to the embedding's) for every tensor, so each one
would pay for page faults and zeroing again (measured: 10x slower fills on a 545 MB buffer).
Inside `retained_heap()` large allocations come from the heap and stay there; on exit the
defaults come back and the heap is trimmed. Peak RSS is unchanged: it is the largest live set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameter numbers (malloc.h)
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextmanager
def retained_heap():
    libc = _glibc()
    if libc is None:  # not glibc (macOS, musl): nothing to tune
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
