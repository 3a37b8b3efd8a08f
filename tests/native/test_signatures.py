"""The ctypes table (qwenlab/native/signatures.py) against the library: the same exported entry points,
and for each the parameter count and kinds (pointer, 64-bit int, int, float) declared in the sources."""

import ctypes
import re
import subprocess

import pytest

from qwenlab import native
from qwenlab.native.build import SOURCES
from qwenlab.native.signatures import SIGNATURES

DEFINITION = re.compile(r"\bint\s+(qwenlab_\w+)\s*\(([^)]*)\)\s*\{")


def declared_parameters() -> dict[str, list[str]]:
    found = {}
    for source in SOURCES:
        for name, parameters in DEFINITION.findall(source.read_text()):
            found[name] = [p.strip() for p in parameters.split(",") if p.strip()]
    return found


def kind(declaration: str) -> type:
    if "*" in declaration:
        return ctypes.c_void_p
    if declaration.startswith(("int64_t", "const int64_t")):
        return ctypes.c_int64
    if declaration.startswith("float"):
        return ctypes.c_float
    if declaration.startswith("int "):
        return ctypes.c_int
    raise AssertionError(f"unexpected parameter type: {declaration}")


def test_the_table_matches_the_sources_parameter_for_parameter():
    declared = declared_parameters()
    assert set(declared) == set(SIGNATURES)
    for name, (argtypes, _) in SIGNATURES.items():
        assert [kind(p) for p in declared[name]] == argtypes, name


def test_the_table_names_exactly_the_library_exports():
    if not native.available():
        pytest.fail(f"the native kernels should build on this host: {native.unavailable_reason()}")
    listed = subprocess.run(["nm", "-D", "--defined-only", str(native.library().path)], capture_output=True,
                            text=True, check=True).stdout
    exported = {line.split()[-1] for line in listed.splitlines() if line.split()[-1].startswith("qwenlab_")}
    assert exported == set(SIGNATURES)
    library = native.library()
    for name, (argtypes, _) in SIGNATURES.items():
        function = getattr(library, name.removeprefix("qwenlab_"))
        assert function.argtypes == argtypes and function.restype is ctypes.c_int
