"""What a variant is: kind, lineage, size on disk, parameters, dtype; `qwenlab ls`; loading any variant.

A variant is a folder: a full model (base, trained, merge, quantized) or a LoRA adapter over a
base. Its lineage.json says how it was made; folders without one are described from their files
(adapter_config.json -> adapter, a "quantization" section -> quantized, else base).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qwenlab.checkpoint.hub import parse_hub_id
from qwenlab.variants.results import Figure, accuracy_figures, latest_all, latest_by_dtype, mean_accuracy, speed_contexts
from qwenlab.checkpoint.lineage import read_lineage
from qwenlab.loading import adapter_base
from qwenlab.checkpoint.dtypes import SHORT_NAMES, element_bytes
from qwenlab.checkpoint.safetensors_file import read_header
from qwenlab.errors import QwenlabError
from qwenlab.text_table import format_table
from qwenlab.model.info import human_bytes, human_count


ADAPTER_CONFIG = "adapter_config.json"
_SKIP_DIRS = {".git", "__pycache__", ".venv", "node_modules"}
INCOMPLETE_MARKER = "INCOMPLETE"  # a recipe run folder that has not finished (recipe/runner.py writes it)
# Written about a variant, not part of it: they do not count in its size.
BOOKKEEPING_FILES = ("measurements.jsonl", "README.md")


@dataclass
class Variant:
    path: Path
    kind: str  # base | trained | adapter | merge | quantized | export
    method: str | None
    lineage: dict | None
    size_bytes: int  # every file in the folder but measurements.jsonl and README.md
    weight_bytes: int  # the tensors only
    parameters: int | None
    dtype: str
    config: object | None = None  # Qwen2Config for full models (the base's for an adapter)
    base: Path | None = None  # the base model an adapter applies to
    files: list[tuple[str, int]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return display_name(self.path)

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter" or (self.path / ADAPTER_CONFIG).is_file()

    def inputs(self) -> list[dict]:
        return (self.lineage or {}).get("inputs", [])


def display_name(path: str | Path) -> str:
    path = Path(path)
    from qwenlab.checkpoint.reader import NANO_DIR

    if path.resolve() == NANO_DIR.resolve():
        return "nano"
    # A hub snapshot (HF cache: models--ORG--NAME/snapshots/COMMIT) is named by its repository id.
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/", 1)
    return path.name


def is_variant_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file())


def _files(folder: Path) -> list[tuple[str, int]]:
    """The variant's own files: those at its top level. Subfolders are not the variant (a training run's
    checkpoints/ held 7 MiB beside a 1.2 MiB adapter and made it look the largest)."""
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _is_training_checkpoint(folder: Path) -> bool:
    return folder.name == "checkpoints" or re.fullmatch(r"checkpoint-\d+", folder.name) is not None


def _headers(folder: Path, names: tuple[str, ...] = ("*.safetensors",)) -> dict[str, dict]:
    tensors = {}
    for pattern in names:
        for path in sorted(folder.glob(pattern)):
            tensors.update(read_header(path))
    return tensors


def _dominant_dtype(tensors: dict[str, dict]) -> str:
    by_dtype: dict[str, int] = {}
    for info in tensors.values():
        numel = 1
        for d in info["shape"]:
            numel *= d
        by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + numel * (element_bytes(info["dtype"]) or 1)
    if not by_dtype:
        return "unknown"
    top = max(by_dtype, key=by_dtype.get)
    return SHORT_NAMES.get(top, top.lower())


def _numel(tensors: dict[str, dict]) -> int:
    total = 0
    for info in tensors.values():
        numel = 1
        for d in info["shape"]:
            numel *= d
        total += numel
    return total


def describe_variant(path: str | Path) -> Variant:
    """Describe a variant folder from its files and lineage.json (headers only, no tensor is read)."""
    from qwenlab.checkpoint.reader import resolve_model_path
    from qwenlab.checkpoint.config import Qwen2Config

    folder = resolve_model_path(path)
    if not is_variant_folder(folder):
        raise QwenlabError(f"{folder}: not a model or adapter folder (no config.json or {ADAPTER_CONFIG})")
    lineage = read_lineage(folder)
    files = _files(folder)
    size = sum(s for name, s in files if name not in BOOKKEEPING_FILES)
    if (folder / ADAPTER_CONFIG).is_file():
        tensors = _headers(folder, ("adapter_model.safetensors",))
        base = adapter_base(folder, lineage)
        config = Qwen2Config.from_file(base / "config.json") if base else None
        return Variant(folder, "adapter", (lineage or {}).get("method") or "lora", lineage, size,
                       sum(s for n, s in files if n.endswith(".safetensors")), _numel(tensors),
                       _dominant_dtype(tensors), config, base, files)
    config = Qwen2Config.from_file(folder / "config.json")
    tensors = _headers(folder)
    quant = config.extra.get("quantization")
    if quant:
        kind = "quantized"
        dtype = f"int{quant.get('bits', '?')} g{quant.get('group_size', '?')} {quant.get('method', '')}".strip()
        parameters = config.parameter_count()  # packed tensors: count from the shapes in config.json
    else:
        kind = "base"
        dtype = _dominant_dtype(tensors)
        parameters = _numel(tensors)
    if lineage and lineage.get("kind"):
        kind = lineage["kind"]
    return Variant(folder, kind, (lineage or {}).get("method"), lineage, size,
                   sum(s for n, s in files if n.endswith(".safetensors")), parameters, dtype, config, None, files)


def warn_if_incomplete_run(folder: Path) -> None:
    """Its models and figures are what the stages that finished made: say so, once per listing."""
    if (folder / INCOMPLETE_MARKER).is_file():
        print(f"note: {folder} is a run that did not finish ({INCOMPLETE_MARKER}); what it holds may be partial",
              file=sys.stderr)


def find_variants(paths: list[str | Path], depth: int = 3) -> list[Variant]:
    """The variants at or below each path (a folder that is not a variant is searched `depth` levels)."""
    found: list[Path] = []

    def walk(folder: Path, level: int) -> None:
        warn_if_incomplete_run(folder)
        if is_variant_folder(folder):
            found.append(folder)
            return
        if level >= depth:
            return
        for child in sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in _SKIP_DIRS
                            and not p.name.startswith(".") and not _is_training_checkpoint(p)):
            walk(child, level + 1)

    for path in paths:
        folder = Path(path)
        if str(path) == "nano" or (not folder.exists() and parse_hub_id(str(path))):
            from qwenlab.checkpoint.reader import resolve_model_path

            found.append(resolve_model_path(str(path)))  # nano, or a hub id's snapshot in the HF cache
            continue
        if not folder.is_dir():
            raise QwenlabError(f"{folder}: no such folder")
        before = len(found)
        walk(folder, 0)
        if len(found) == before:
            raise QwenlabError(f"{folder}: no model or adapter folders found (looked {depth} levels down)")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return [describe_variant(p) for p in unique]


# ---- lineage ------------------------------------------------------------------------------


def made_from(variant: Variant) -> str:
    """One line: `merge slerp of A + B (base A)`, `adapter lora-sft over nano`, `base`."""
    if variant.lineage is None:
        if variant.kind == "adapter":
            return f"adapter over {display_name(variant.base) if variant.base else 'unknown base'} (no lineage.json)"
        return f"{variant.kind} (no lineage.json)"
    inputs = [i for i in variant.inputs() if i.get("kind") != "file"]
    names = ", ".join(f"{i['role']}={display_name(i['path'])}" for i in inputs) or "-"
    return f"{variant.kind} {variant.method or ''} from {names}".replace("  ", " ")


def short_origin(variant: Variant, names: dict[str, str] | None = None) -> str:
    """`slerp: base, finetune` for the tables; '-' for a base model. names: resolved path -> display name."""
    names = names or {}

    def name(path) -> str:
        return names.get(str(Path(path).resolve()), display_name(path))

    inputs = [i for i in variant.inputs() if i.get("kind") != "file"]
    if not inputs:
        if variant.kind == "adapter" and variant.base is not None:
            return f"{variant.method or 'lora'}: {name(variant.base)}"
        return "-" if variant.kind == "base" else f"{variant.method or variant.kind}: ?"
    return f"{variant.method or variant.kind}: " + ", ".join(_joined_with_adapters(inputs, name))


def _joined_with_adapters(inputs: list[dict], name) -> list[str]:
    """Input names in order, a merge's `BASE+ADAPTER` input (roles `modelN`, `modelN-adapter`) as one."""
    shown: list[str] = []
    roles: list[str] = []
    for item in inputs:
        role = str(item.get("role", ""))
        if role.endswith("-adapter") and roles and roles[-1] == role.removesuffix("-adapter"):
            shown[-1] = f"{shown[-1]}+{name(item['path'])}"
        else:
            shown.append(name(item["path"]))
        roles.append(role)
    return shown


def lineage_chain(variant: Variant, max_depth: int = 8) -> list[dict]:
    """The variant and its ancestors, nearest first: [{name, path, kind, method, role, sha256}]."""
    chain, seen = [], set()
    current: Path | None = variant.path
    role = "this model"
    sha = None
    lineage = variant.lineage
    kind = variant.kind
    for _ in range(max_depth):
        if current is None or current.resolve() in seen:
            break
        seen.add(current.resolve())
        chain.append({"name": display_name(current), "path": str(current), "kind": kind,
                      "method": (lineage or {}).get("method"), "role": role, "sha256": sha,
                      "inputs": [{"role": i.get("role"), "name": display_name(i.get("path", "")),
                                  "sha256": i.get("sha256"), "kind": i.get("kind")}
                                 for i in (lineage or {}).get("inputs", [])]})
        parents = [i for i in (lineage or {}).get("inputs", []) if i.get("kind") != "file"]
        parent = next((i for i in parents if i.get("role") in ("base", "source")), parents[0] if parents else None)
        if parent is None or not Path(parent.get("path", "")).is_dir():
            break
        current, role, sha = Path(parent["path"]), parent.get("role"), parent.get("sha256")
        lineage = read_lineage(current)
        kind = (lineage or {}).get("kind") or parent.get("kind") or "base"
    return chain


# ---- tables -------------------------------------------------------------------------------


def speed_at(speed: dict[str, Figure], context: int | None = None) -> tuple[int, Figure] | None:
    """The figures at `context`, or at the largest measured context."""
    contexts = speed_contexts(speed)
    if not contexts:
        return None
    ctx = context if context in contexts else contexts[-1]
    return ctx, speed[str(ctx)]


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def run_dtype(variant: Variant, measured: dict[str, dict[str, Figure]]) -> str | None:
    """Which measured dtype's speed represents a variant: the one it is stored in (int4 for an int4
    folder), else the most recently measured one."""
    if not measured:
        return None
    quant = variant.config.extra.get("quantization") if variant.config is not None and variant.kind != "adapter" \
        else None
    own = f"int{quant.get('bits')}" if quant else variant.dtype
    if own in measured:
        return own
    return max(measured, key=lambda d: max((f.time for f in measured[d].values()), default=""))


def summary_row(variant: Variant, figures: dict[str, dict[str, Figure]]) -> dict:
    """The figures `ls` and `compare` show for one variant (None where not measured)."""
    accuracy = figures.get("accuracy", {})
    by_dtype = latest_by_dtype(variant.path)
    speed_dtype = run_dtype(variant, by_dtype)
    own_speed = by_dtype.get(speed_dtype, {}) if speed_dtype else {}
    speed = speed_at(own_speed)
    perplexity = figures.get("perplexity", {})
    ppl = next(iter(perplexity.values())).values.get("perplexity") if len(perplexity) == 1 else None
    peak = max((f.values.get("peak_rss_bytes") or 0 for f in own_speed.values()), default=0) or None
    return {
        "name": variant.name, "path": str(variant.path), "kind": variant.kind, "method": variant.method,
        "made_from": made_from(variant), "from": short_origin(variant), "size_bytes": variant.size_bytes,
        # What must be on disk to run it: an adapter needs its base too.
        "deploy_bytes": variant.size_bytes + (_weights_size(variant.base) if variant.is_adapter and variant.base
                                              else 0),
        "parameters": variant.parameters,
        "dtype": variant.dtype, "tasks": {t: f.values.get("accuracy") for t, f in accuracy.items()},
        "task_n": {t: f.values.get("n") for t, f in accuracy.items()},
        "mean_accuracy": mean_accuracy(accuracy),
        "perplexity": ppl, "perplexity_items": {k: f.values.get("perplexity") for k, f in perplexity.items()},
        "speed_context": speed[0] if speed else None,
        "decode_tokens_per_s": speed[1].values.get("decode_tokens_per_s") if speed else None,
        "ttft_s": speed[1].values.get("ttft_s") if speed else None,
        "peak_rss_bytes": peak,
        "speed_dtype": speed_dtype,  # the dtype the speed figures above were measured in
        "speed": {ctx: own_speed[str(ctx)].values for ctx in speed_contexts(own_speed)},
        "speed_by_dtype": {dtype: {ctx: by_ctx[str(ctx)].values for ctx in speed_contexts(by_ctx)}
                           for dtype, by_ctx in by_dtype.items()},
    }


def _weights_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def size_text(row: dict) -> str:
    """'1.2 GiB', or for an adapter '24 KiB + base'."""
    text = human_bytes(row["size_bytes"])
    return f"{text} + base" if row["deploy_bytes"] != row["size_bytes"] else text


def list_variants(paths: list[str | Path]) -> list[dict]:
    rows = []
    for variant in find_variants(paths):
        row = summary_row(variant, latest_all(variant.path))
        # Every accuracy setting measured, so a figure at another n or difficulty is shown, not hidden.
        row["accuracy_settings"] = {task: [{k: f.values.get(k) for k in ("accuracy", "n", "difficulty", "seed")}
                                           | {"dtype": f.setup.get("dtype"), "time": f.time} for f in figures]
                                    for task, figures in accuracy_figures(variant.path).items()}
        rows.append(row)
    return rows


def _accuracy_text(row: dict) -> str:
    """'0.512 (4 tasks, n=200)'; '+2 other settings' when other n/difficulty/seed figures exist too."""
    if row["mean_accuracy"] is None:
        return "-"
    tasks = len(row["tasks"])
    ns = sorted({n for n in row["task_n"].values() if n is not None})
    n_text = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}" if ns else "n=?"
    others = sum(len(figures) - 1 for figures in row.get("accuracy_settings", {}).values())
    extra = f", +{others} other setting{'s' * (others != 1)}" if others else ""
    return f"{row['mean_accuracy']:.3f} ({tasks} task{'s' * (tasks != 1)}, {n_text}{extra})"


def format_listing(rows: list[dict], markdown: bool = False) -> str:
    headers = ["variant", "kind", "made from", "size", "params", "dtype", "mean acc", "ppl", "tok/s", "TTFT",
               "peak RSS"]
    table = []
    for r in rows:
        ctx = f"@{r['speed_context']}" if r["speed_context"] else ""
        table.append([
            r["name"], r["kind"], r["from"],
            size_text(r), human_count(r["parameters"]) if r["parameters"] else "-", r["dtype"],
            _accuracy_text(r),
            _fmt(r["perplexity"], ".2f") if r["perplexity"] is not None else
            ("several" if r["perplexity_items"] else "-"),
            f"{r['decode_tokens_per_s']:.1f}{ctx}" if r["decode_tokens_per_s"] is not None else "-",
            f"{r['ttft_s'] * 1000:.0f} ms{ctx}" if r["ttft_s"] is not None else "-",
            human_bytes(r["peak_rss_bytes"]) if r["peak_rss_bytes"] else "-",
        ])
    return format_table(headers, table, markdown, align="lllrrlrrrrr")


# ---- loading ------------------------------------------------------------------------------


def load_variant(path: str | Path, dtype: str = "fp32", adapters: list | tuple = ()):
    """(model, tokenizer, Variant) for any variant: a model folder, 'nano', or an adapter over its base.

    One adapter (the folder itself, or `adapters=[...]`) is attached unmerged and made active, as at serving
    time, and is the variant measured; several are merged in order into the base.
    """
    from qwenlab.loading import load

    variant = describe_variant(path)
    adapters = list(adapters)
    loaded = load(variant.path, dtype, adapters, adapter_mode="attach" if len(adapters) <= 1 else "merge")
    if len(adapters) == 1 and variant.kind != "adapter":
        variant = describe_variant(adapters[0])  # the measured variant is the adapter
    return loaded.model, loaded.tokenizer, variant
