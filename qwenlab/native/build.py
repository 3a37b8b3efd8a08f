"""Compile qwenlab's native kernels once per machine, and load only what this install built.

- Flags are explicit (AVX-512 F/BW/VL, VNNI, F16C, FMA), never -march=native: a native build can turn
  on instruction sets (AMX) whose use faults on some hosts.
- The library lives in a cache folder that only the user can write, under a name keyed by the hash of
  the sources and flags; its own sha256 is recorded at build time and checked before every load, so a
  file swapped in later is refused.
- Before the caller loads it, a child process runs `qwenlab_probe` (probe.cpp): a host that advertises
  the instruction sets but cannot execute them kills the child, not the caller. The same child then runs
  `qwenlab_probe_bf16` (vdpbf16ps, float_matmul.cpp), which the build flags do not turn on: only the
  functions that say so use it, and only where this probe ran it (`bf16_dot_runs`); elsewhere bf16
  weights take the AVX-512F widening path.
- The build says one line when it starts and one when it ends; a failure is reported once by the
  caller (`native.unavailable_reason()`) with the slower path it falls back to.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qwenlab.home import qwenlab_home

HERE = Path(__file__).parent
QUANT_KERNELS = HERE.parent / "quant" / "native"  # the int8/int4 matmul and decode stack: one library for all
SOURCES = [HERE / "lora_bgmv.cpp", HERE / "decode_attention.cpp", HERE / "prefill_attention.cpp", HERE / "probe.cpp",
           HERE / "token_mask.cpp", QUANT_KERNELS / "qmatmul.cpp", QUANT_KERNELS / "float_matmul.cpp",
           QUANT_KERNELS / "decode_stack.cpp"]
HEADERS = [HERE / "vec.h", HERE / "pool.h", HERE / "lora_bgmv.h"]
FLAGS = ["-O3", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma",
         "-pthread", "-shared", "-fPIC"]
PROBE_SEED = 3
PROBE_EXPECTED = PROBE_SEED * PROBE_SEED + PROBE_SEED + 1 + 5  # probe.cpp: dot + add + 1, fp16 subnormal -> 0, fma 5
PROBE_BF16_EXPECTED = 2 * PROBE_SEED * PROBE_SEED  # float_matmul.cpp: one vdpbf16ps of seed by seed, two pairs
_bf16_dot = {}  # library path -> whether vdpbf16ps ran in the probe child


class NativeBuildError(Exception):
    """The kernels cannot be built, verified or run here; the message says why."""


def private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) or check an existing one: a real folder owned by this user that no one
    else can write. A library loaded from a folder others can write would run their code."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise NativeBuildError(f"kernel cache {path} is not a plain folder")
    if info.st_uid != os.getuid():
        raise NativeBuildError(f"kernel cache {path} belongs to another user")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NativeBuildError(f"kernel cache {path} is writable by other users (chmod 700 it)")
    return path


def build_key() -> str:
    source = b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])  # a header change rebuilds too
    return hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compile(target: Path) -> None:
    compiler = os.environ.get("CXX", "g++")
    print(f"qwenlab: compiling native kernels with {compiler} (once per machine)...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        try:
            subprocess.run([compiler, *FLAGS, f"-I{HERE}", "-o", str(out), *map(str, SOURCES)],
                           check=True, capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace").strip().splitlines()
            raise NativeBuildError(f"compiling failed: {detail[0] if detail else e}") from None
        digest = _sha256(out)
        digest_file = Path(tmp) / (target.name + ".sha256")
        digest_file.write_text(digest + "\n")
        os.replace(out, target)  # atomic: concurrent first uses never load a half-written file
        os.replace(digest_file, target.with_name(target.name + ".sha256"))
    print(f"qwenlab: native kernels built in {time.perf_counter() - started:.1f} s ({target})",
          file=sys.stderr, flush=True)


def _verify(target: Path) -> None:
    """The file is ours: owned by this user, not writable by others, and its hash is the recorded one."""
    info = os.lstat(target)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NativeBuildError(f"{target} is not a private file of this user; delete it to rebuild")
    recorded = target.with_name(target.name + ".sha256")
    if not recorded.is_file() or recorded.read_text().strip() != _sha256(target):
        raise NativeBuildError(f"{target} does not match the hash recorded when it was built; delete it to rebuild")


def _probe(target: Path) -> None:
    """Run qwenlab_probe, then qwenlab_probe_bf16, in a child process (plain Python + ctypes: no torch
    import, ~30 ms). The first must run; the second may die (a CPU without AVX512-BF16): that only
    keeps bf16 weights on the widening path."""
    code = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); "
            f"print(lib.qwenlab_probe({PROBE_SEED}), flush=True); "
            f"print(lib.qwenlab_probe_bf16({PROBE_SEED}), flush=True)")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeBuildError(f"the instruction probe could not run ({e})") from None
    lines = done.stdout.split()
    if not lines:
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        raise NativeBuildError(f"this CPU cannot execute the kernels' instructions (probe died with {how})")
    if lines[0] != str(PROBE_EXPECTED):
        raise NativeBuildError(f"the instruction probe returned {lines[0]!r}, expected {PROBE_EXPECTED}")
    _bf16_dot[target] = done.returncode == 0 and lines[1:] == [str(PROBE_BF16_EXPECTED)]


def bf16_dot_runs(target: Path) -> bool:
    """Whether the probe child ran vdpbf16ps (AVX512-BF16) from the library at `target`."""
    return _bf16_dot.get(target, False)


def built_library() -> Path:
    """The path of a verified, probed kernel library for this machine, compiling it on first use."""
    folder = private_dir(qwenlab_home() / "kernels")
    target = folder / f"libqwenlab_qmatmul-{build_key()}.so"
    if not target.is_file():
        _compile(target)
    _verify(target)
    _probe(target)
    return target
