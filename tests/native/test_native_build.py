"""The native kernel build: explicit flags, a private cache checked by hash, a probe in a child process,
one line at the start and end of a build, and one line naming the fallback when it cannot be used."""

import os
import shutil
import subprocess
import sys

import pytest

from qwenlab.native import build


def test_flags_are_explicit_and_never_native_or_amx():
    assert not any(flag.startswith("-march") or flag.startswith("-mtune") for flag in build.FLAGS)
    assert not any("amx" in flag for flag in build.FLAGS)


def run_child(code: str, cache, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "QWENLAB_HOME": str(cache), **env})


AVAILABLE = "from qwenlab import native; print(native.available(), native.available())"


def test_a_failed_build_says_so_once_and_names_the_fallback(tmp_path):
    done = run_child(AVAILABLE, tmp_path, CXX="false")
    assert done.returncode == 0 and done.stdout.split() == ["False", "False"]
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("qwenlab: compiling native kernels with false")
    unavailable = [line for line in lines if "native kernels unavailable" in line]
    assert len(unavailable) == 1 and "compiling failed" in unavailable[0] and "PyTorch's kernels" in unavailable[0]


def test_a_build_prints_its_start_and_its_time_and_later_runs_are_silent(tmp_path):
    first = run_child(AVAILABLE, tmp_path)
    assert first.returncode == 0 and first.stdout.split() == ["True", "True"], first.stderr
    start, end = first.stderr.strip().splitlines()
    assert start.startswith("qwenlab: compiling native kernels") and " s (" in end and "built in" in end
    folder = tmp_path / "kernels"
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    second = run_child(AVAILABLE, tmp_path)
    assert second.stdout.split() == ["True", "True"] and second.stderr == ""


@pytest.fixture
def built_copy(tmp_path, monkeypatch):
    """This install's kernel library, copied (with its recorded hash) into a fresh private cache."""
    from qwenlab import native

    if not native.available():
        pytest.fail(f"the native kernels should build on this host: {native.unavailable_reason()}")
    source = native.library().path
    monkeypatch.setenv("QWENLAB_HOME", str(tmp_path))
    folder = build.private_dir(tmp_path / "kernels")
    shutil.copy(source, folder / source.name)
    shutil.copy(source.with_name(source.name + ".sha256"), folder / (source.name + ".sha256"))
    return folder / source.name


def test_the_verified_library_loads(built_copy):
    assert build.built_library() == built_copy


def test_a_swapped_library_is_refused(built_copy):
    data = bytearray(built_copy.read_bytes())
    data[-1] ^= 0xFF
    built_copy.write_bytes(bytes(data))
    with pytest.raises(build.NativeBuildError, match="does not match the hash recorded"):
        build.built_library()


def test_a_cache_others_can_write_is_refused(built_copy):
    built_copy.parent.chmod(0o777)
    with pytest.raises(build.NativeBuildError, match="writable by other users"):
        build.built_library()


def test_a_symlinked_cache_is_refused(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "kernels").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("QWENLAB_HOME", str(tmp_path / "root"))
    with pytest.raises(build.NativeBuildError, match="not a plain folder"):
        build.built_library()
