"""Loading the native library once per process, the kernels' thread policy, and their status codes."""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

import torch

from qwenlab.native.build import NativeBuildError, bf16_dot_runs, built_library
from qwenlab.native.signatures import Library

_status = {"reason": None}


def _cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx512f", "avx512bw", "avx512_vnni", "f16c"))


@lru_cache(maxsize=1)
def library() -> Library | None:
    if os.environ.get("QWENLAB_NATIVE", "1") == "0":
        _status["reason"] = "disabled by QWENLAB_NATIVE=0"
        return None
    if not _cpu_has_vnni():
        _status["reason"] = "this CPU lacks AVX-512 VNNI"
        return None
    try:
        lib = Library(built_library())
    except (OSError, NativeBuildError) as e:
        _status["reason"] = str(e)
        # Said once per process (library() is cached), with the path every caller falls back to.
        print(f"qwenlab: native kernels unavailable ({e}); using PyTorch's kernels instead (slower)",
              file=sys.stderr, flush=True)
        return None
    _set_float_path(lib, os.environ.get("QWENLAB_FLOAT_KERNEL"))
    return lib


# ---- the bf16 kernel path, chosen at run time ------------------------------------------------------------
FLOAT_PATHS = ("avx512bf16", "avx512f")  # vdpbf16ps where the probe child ran it; the widening path anywhere


def _set_float_path(lib: Library, requested: str | None) -> None:
    if requested not in (None, "", *FLOAT_PATHS):
        raise ValueError(f"QWENLAB_FLOAT_KERNEL must be one of {', '.join(FLOAT_PATHS)}, got {requested!r}")
    dot = bf16_dot_runs(lib.path) and requested != "avx512f"  # asking for avx512bf16 cannot turn on what failed
    lib.float_path(1 if dot else 0)


def force_float_path(name: str | None) -> str:
    """Use `name` ("avx512f": the widening path even where vdpbf16ps runs; None: the best this CPU runs)
    for bf16 weights from now on, in this process; returns the path now in use. For tests and benchmarks;
    the environment's QWENLAB_FLOAT_KERNEL does the same for a whole run."""
    _set_float_path(library(), name)
    return float_path("bf16").split(":")[1]


def float_path(dtype: str) -> str:
    """The kernel a float weight format runs on here, as the bench prints it: "bf16:avx512bf16",
    "bf16:avx512f", "fp32:avx512f", or "<dtype>:torch" where the native library does not run."""
    lib = library()
    if lib is None:
        return f"{dtype}:torch"
    return f"{dtype}:{FLOAT_PATHS[0] if dtype == 'bf16' and lib.float_path(-1) == 1 else 'avx512f'}"


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str | None:
    library()
    return _status["reason"]


# ---- threads ---------------------------------------------------------------------------------------
_kernel_threads: int | None = None


def kernel_threads() -> int:
    return _kernel_threads or torch.get_num_threads()


class torch_single_threaded:
    """Run PyTorch's own ops on one thread while the kernel keeps all of them.

    A decode step is ~100 tiny PyTorch ops between the matmuls; when PyTorch runs them with OpenMP,
    every parallel region ends in a barrier that waits for every thread, and on a shared machine a
    preempted thread holds up each of those barriers (measured: 2 threads decoded 4-6x slower than
    1). The kernel's own pool never waits for a thread that has not started (qmatmul.cpp).
    """

    def __enter__(self):
        global _kernel_threads
        self.saved = (_kernel_threads, torch.get_num_threads())
        _kernel_threads = self.saved[0] or self.saved[1]
        if self.saved[1] != 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        global _kernel_threads
        _kernel_threads = self.saved[0]
        if self.saved[1] != 1:
            torch.set_num_threads(self.saved[1])


class torch_threads_on_free_cores:
    """Run PyTorch's ops with as many threads as there are cores other processes left free lately.

    OpenMP's barriers wait for every thread: with another process holding one of two cores, a 2-thread
    fp32 forward ran 150 times slower than a 1-thread one (issue 23: nano decode at 3.8 tok/s against 570).
    The estimate is /proc/stat's busy time less this process's own CPU time since the previous call (at
    least MIN_INTERVAL_S apart, else the previous estimate stands); without /proc/stat nothing changes.
    """

    MIN_INTERVAL_S = 0.05
    _last: tuple | None = None  # (monotonic s, busy jiffies, own CPU s)
    _others = 0.0  # cores other processes used over the last interval

    @classmethod
    def others(cls) -> float:
        import time

        now = time.monotonic()
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:8]]
        except (OSError, ValueError):
            return 0.0
        busy = sum(fields) - fields[3] - fields[4]
        times = os.times()
        own = times.user + times.system
        last = cls._last
        if last is None or now - last[0] >= cls.MIN_INTERVAL_S:
            if last is not None:
                used = (busy - last[1]) / os.sysconf("SC_CLK_TCK") - (own - last[2])
                cls._others = max(0.0, used / (now - last[0]))
            cls._last = (now, busy, own)
        return cls._others

    def __enter__(self):
        self.saved = torch.get_num_threads()
        cores = os.cpu_count() or self.saved
        free = max(1, int(cores - self.others() + 0.5))
        if free < self.saved:
            torch.set_num_threads(free)
        return self

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.saved:
            torch.set_num_threads(self.saved)


# ---- status codes of the entry points (vec.h) ---------------------------------------------------------
NOT_APPLICABLE, NO_MEMORY, BAD_SIZES = -1, -2, -3


class KernelArgumentError(ValueError):
    """A native kernel refused its arguments before touching them: a buffer that does not fit the sizes
    it was given (a bug, or a crafted model file that got past the loader's checks)."""


def checked(status: int, kernel: str) -> int:
    """A kernel's status, its errors raised: BAD_SIZES as KernelArgumentError, NO_MEMORY as MemoryError;
    OK and NOT_APPLICABLE (the caller then takes PyTorch's path) are returned."""
    if status == BAD_SIZES:
        raise KernelArgumentError(f"native {kernel}: a buffer's length does not fit the dimensions it was "
                                  "given; nothing was computed")
    if status == NO_MEMORY:
        raise MemoryError(f"native {kernel}: out of memory")
    return status


def buffer(t: torch.Tensor, dtype: torch.dtype, what: str, kernel: str) -> tuple[int, int]:
    """(address, length in elements) of a tensor a kernel reads or writes. It must hold `dtype` and be
    contiguous, so that `length` elements from the address are the tensor's own memory (an expanded
    tensor has more elements than memory); the kernel checks the length against its dimensions."""
    if t.dtype != dtype or not t.is_contiguous():
        raise KernelArgumentError(f"native {kernel}: {what} must be a contiguous {dtype} tensor, got "
                                  f"{'a non-contiguous ' if not t.is_contiguous() else ''}{t.dtype}")
    return t.data_ptr(), t.numel()


def optional_buffer(t: torch.Tensor | None, dtype: torch.dtype, what: str, kernel: str) -> tuple[int | None, int]:
    return (None, 0) if t is None else buffer(t, dtype, what, kernel)


