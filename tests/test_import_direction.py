"""Imports run one way: the CLI and recipes on top, then the capabilities, then model/ and checkpoint/, then
errors. ALLOWED is the whole map: the packages each package may import. The test walks every import in
qwenlab/ (top-level and inside functions) and fails on any arrow the map does not hold, and on a map
with a cycle."""

import ast
from pathlib import Path

import qwenlab

PACKAGE = Path(qwenlab.__file__).parent

BASE = {"errors", "home", "yaml_file", "text_table", "stats"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "home": set(),
    "yaml_file": {"errors"},
    "text_table": set(),
    "stats": set(),
    "checkpoint": {"errors"},
    "model": {"errors", "checkpoint"},
    "native": {"home"},
    "tasks": {"errors", "yaml_file"},
    "adapters": BASE | {"checkpoint", "model"},
    "quant": BASE | {"checkpoint", "model", "native"},
    "loading": BASE | {"checkpoint", "model", "adapters", "quant"},
    "variants": BASE | {"checkpoint", "model", "loading"},
    "eval": BASE | {"checkpoint", "model", "loading", "tasks", "variants"},
    "report": BASE | {"checkpoint", "model", "loading", "tasks", "variants", "eval"},
    "bench": BASE | {"checkpoint", "model", "native", "quant", "loading", "variants"},
    "train": BASE | {"checkpoint", "model", "adapters", "tasks", "quant"},
    "merge": BASE | {"checkpoint", "model", "adapters", "loading", "tasks", "variants", "eval", "report"},
    "serve": BASE | {"checkpoint", "model", "native", "adapters", "quant", "loading"},
    "swarm": BASE | {"checkpoint", "model", "adapters", "tasks", "train"},
    "nano": BASE | {"checkpoint", "model", "tasks"},
    "recipe": BASE | {"checkpoint", "model", "adapters", "quant", "loading", "tasks", "variants", "eval", "report",
                      "bench", "train", "merge", "swarm"},
    "cli": BASE | {"checkpoint", "model", "adapters", "quant", "loading", "tasks", "variants", "eval", "report",
                   "bench", "train", "merge", "serve", "swarm", "nano", "recipe"},
    "__init__": {"loading"},  # the facade: qwenlab.load
    "__main__": {"cli"},
}


def imported_packages(path: Path) -> set[str]:
    """qwenlab.X for every import of qwenlab.X... in the file; `import qwenlab` (its __version__, its path) is free."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "qwenlab" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "qwenlab" and len(parts) > 1 and parts[1] != "__version__":
                found.add(parts[1])
    return found


def test_every_import_follows_the_map():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        package = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        assert package in ALLOWED, f"{relative}: package '{package}' is not in the map; add it to ALLOWED"
        for target in imported_packages(path) - {package}:
            if target not in ALLOWED[package]:
                wrong.append(f"{relative} imports qwenlab.{target}")
    assert not wrong, "imports against the map:\n" + "\n".join(wrong)


def test_the_map_has_no_cycle():
    state: dict[str, str] = {}

    def visit(package: str, trail: list[str]) -> None:
        if state.get(package) == "done":
            return
        assert state.get(package) != "open", "cycle: " + " -> ".join([*trail, package])
        state[package] = "open"
        for target in ALLOWED.get(package, ()):
            visit(target, [*trail, package])
        state[package] = "done"

    for package in ALLOWED:
        visit(package, [])


def test_the_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from qwenlab.cli.model import cmd_info\n    import qwenlab.serve.app\n"
                      "from qwenlab import loading, __version__\nimport qwenlab\n")
    assert imported_packages(source) == {"cli", "serve", "loading"}
