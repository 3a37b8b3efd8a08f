"""The measurement store: every measured figure of a variant, appended to `<folder>/measurements.jsonl`.

One JSON line per measurement run:

    {"schema": 1, "kind": "accuracy" | "speed" | "perplexity",
     "figures": {ITEM: {METRIC: value, ...}, ...},   # ITEM: a task, a context size, a data file
     "setup": {...},                                 # dtype, n, seed, threads: what the figures depend on
     "command": "qwenlab eval ...", "time": "2025-01-01T00:00:00Z", "versions": {...}, "machine": {...},
     "fingerprint": "..."}                           # of the weights measured (see weights_fingerprint)

Items per kind (metrics are free, these are the ones ls / compare / card read):
    accuracy    task name        -> {"accuracy", "n", "seed", "difficulty", "rewards": per instance, in order}
    speed       context tokens   -> {"ttft_s", "decode_tokens_per_s", "peak_rss_bytes"}
    perplexity  data file name   -> {"perplexity", "tokens", "bits_per_byte"}

`latest(folder, kind)` merges the records newest-wins per item, so an eval of one task does not
hide an older eval of another; for accuracy a larger n wins over a newer smaller one, and
`accuracy_figures` keeps every setting, so `compare` can pair variants measured alike. Records whose fingerprint no longer matches the folder's weights
(the folder was overwritten) are ignored. Folders that cannot be written (a read-only cache, the
nano model inside the package) keep their records under ~/.cache/qwenlab/measurements/, keyed by
the fingerprint, so they are found again from the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qwenlab.checkpoint.lineage import library_versions
from qwenlab.errors import QwenlabError
from qwenlab.home import qwenlab_home

MEASUREMENTS_FILE = "measurements.jsonl"
SCHEMA = 1
KINDS = ("accuracy", "speed", "perplexity")
_WEIGHT_SUFFIXES = (".safetensors", ".gguf")
_SAMPLES, _SAMPLE_BYTES = 8, 1 << 14


@dataclass
class Figure:
    """One item's latest figures, with when and how they were measured."""

    values: dict
    time: str
    setup: dict = field(default_factory=dict)
    command: str = ""
    machine: dict = field(default_factory=dict)


def weights_fingerprint(folder: str | Path) -> str:
    """A cheap content fingerprint: config/adapter JSON in full, each weight file's size and 8 sampled blocks.

    Not an integrity check (lineage.json's sha256 is); it tells whether a folder still holds the
    weights a figure was measured on, in milliseconds even for a 3B model.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name in ("config.json", "adapter_config.json"):
            digest.update(path.name.encode() + path.read_bytes())
        elif path.suffix in _WEIGHT_SUFFIXES and path.is_file():
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as f:
                for i in range(_SAMPLES):
                    f.seek(max(0, (size - _SAMPLE_BYTES) * i // (_SAMPLES - 1)))
                    digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:32]


def cache_dir() -> Path:
    return qwenlab_home() / "measurements"


def _inside_package(folder: Path) -> bool:
    import qwenlab

    package = Path(qwenlab.__file__).resolve().parent
    return folder.resolve().is_relative_to(package)


def store_path(folder: str | Path, fingerprint: str | None = None) -> Path:
    """Where new records for `folder` go: the folder itself when writable, else the user cache."""
    folder = Path(folder)
    if os.access(folder, os.W_OK) and not _inside_package(folder):
        return folder / MEASUREMENTS_FILE
    return cache_dir() / f"{fingerprint or weights_fingerprint(folder)}.jsonl"


def machine() -> dict:
    """What the figures were measured on: CPU model, logical cores, OS."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.machine(), "cores": os.cpu_count(), "system": platform.system()}


def current_command() -> str:
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
    return shlex.join(argv)


def record_measurement(folder: str | Path, kind: str, figures: dict[str, dict], *, setup: dict | None = None,
                       command: str | None = None) -> Path:
    """Append one measurement of `folder` (a model or adapter folder); returns the file written."""
    if kind not in KINDS:
        raise QwenlabError(f"measurement kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(figures, dict) or not all(isinstance(v, dict) for v in figures.values()):
        raise QwenlabError("figures must map an item (task, context, file) to a dict of metrics")
    folder = Path(folder)
    fingerprint = weights_fingerprint(folder)
    record = {"schema": SCHEMA, "kind": kind, "figures": {str(k): v for k, v in figures.items()},
              "setup": setup or {}, "command": command if command is not None else current_command(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": library_versions(),
              "machine": machine(), "fingerprint": fingerprint}
    path = store_path(folder, fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one short line per write: appends do not interleave
        f.write(json.dumps(record, default=str) + "\n")
    return path


def _read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from an interrupted write
        if isinstance(record, dict) and record.get("kind") in KINDS and isinstance(record.get("figures"), dict):
            records.append(record)
    return records


def read_measurements(folder: str | Path, include_stale: bool = False) -> list[dict]:
    """Every record of `folder` (its own file and the user cache), oldest first."""
    folder = Path(folder)
    fingerprint = weights_fingerprint(folder)
    records = _read_lines(folder / MEASUREMENTS_FILE) + _read_lines(cache_dir() / f"{fingerprint}.jsonl")
    if not include_stale:
        records = [r for r in records if r.get("fingerprint") in (None, fingerprint)]
    return sorted(records, key=lambda r: r.get("time", ""))


def latest(folder: str | Path, kind: str, records: list[dict] | None = None, where: dict | None = None
           ) -> dict[str, Figure]:
    """item -> its newest Figure of this kind (only records whose setup matches `where`, if given).

    Accuracy is the exception: a smaller-n evaluation never replaces a larger one, so per task the
    figure on the most instances wins and, among equal n, the newest (`accuracy_figures` keeps all)."""
    merged: dict[str, Figure] = {}
    for record in records if records is not None else read_measurements(folder):
        if record["kind"] != kind:
            continue
        if where and any((record.get("setup") or {}).get(k) != v for k, v in where.items()):
            continue
        for item, values in record["figures"].items():
            figure = Figure(values, record.get("time", ""), record.get("setup") or {}, record.get("command", ""),
                            record.get("machine") or {})
            if kind == "accuracy" and item in merged and _instances(figure) < _instances(merged[item]):
                continue
            merged[item] = figure
    return merged


def _instances(figure: Figure) -> int:
    n = figure.values.get("n")
    return n if isinstance(n, int) else 0


def accuracy_setting(figure: Figure) -> tuple:
    """What must match for two accuracy figures to be compared: (difficulty, seed). The instances of a
    task are a stable prefix in n (qwenlab.tasks.sample_instances), so figures at one setting and
    different n share their first min(n) prompts."""
    values = figure.values
    return (values.get("difficulty", figure.setup.get("difficulty")), values.get("seed", figure.setup.get("seed")))


def accuracy_figures(folder: str | Path, records: list[dict] | None = None) -> dict[str, list[Figure]]:
    """task -> every distinct accuracy measurement (the newest per setting, n and dtype), largest n first."""
    kept: dict[str, dict[tuple, Figure]] = {}
    for record in records if records is not None else read_measurements(folder):
        if record["kind"] != "accuracy":
            continue
        for item, values in record["figures"].items():
            figure = Figure(values, record.get("time", ""), record.get("setup") or {}, record.get("command", ""),
                            record.get("machine") or {})
            key = (*accuracy_setting(figure), _instances(figure), figure.setup.get("dtype"))
            kept.setdefault(item, {})[key] = figure  # records are oldest first: the newest stays
    return {task: sorted(by_key.values(), key=lambda f: (_instances(f), f.time), reverse=True)
            for task, by_key in kept.items()}


def rewards_of(figure: Figure) -> list[float] | None:
    """The per-instance rewards stored with an accuracy figure (None for records made before they were kept)."""
    rewards = figure.values.get("rewards")
    if isinstance(rewards, list) and len(rewards) == _instances(figure) and \
            all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rewards):
        return [float(r) for r in rewards]
    return None


def latest_all(folder: str | Path) -> dict[str, dict[str, Figure]]:
    """kind -> item -> Figure, for every kind (empty dicts where nothing was measured)."""
    records = read_measurements(folder)
    return {kind: latest(folder, kind, records) for kind in KINDS}


def latest_by_dtype(folder: str | Path, kind: str = "speed", records: list[dict] | None = None
                    ) -> dict[str, dict[str, Figure]]:
    """dtype -> item -> newest Figure: speed of one folder run as fp32 and as bf16 are two rows."""
    records = records if records is not None else read_measurements(folder)
    dtypes = dict.fromkeys((r.get("setup") or {}).get("dtype") for r in records if r["kind"] == kind)
    return {str(d): latest(folder, kind, records, where={"dtype": d}) for d in dtypes}


# ---- helpers for the three kinds ------------------------------------------------------------


def record_accuracy(folder, results: dict, *, seed: int, difficulty: int | None | dict = None, dtype: str = "fp32",
                    extra_setup: dict | None = None) -> Path:
    """Record qwenlab.eval.task_eval results ({task: TaskResult}); `difficulty` may be given per task."""
    per_task = difficulty if isinstance(difficulty, dict) else {task: difficulty for task in results}
    figures = {task: accuracy_values(r, seed=seed, difficulty=per_task.get(task)) for task, r in results.items()}
    return record_measurement(folder, "accuracy", figures,
                              setup={"dtype": dtype, "seed": seed,
                                     "difficulty": None if isinstance(difficulty, dict) else difficulty,
                                     "decoding": "greedy", **(extra_setup or {})})


def accuracy_values(result, *, seed: int, difficulty: int | None) -> dict:
    """The stored figure of one qwenlab.eval.task_eval.TaskResult, its per-instance rewards included."""
    rewards = [int(r) if r in (0.0, 1.0) else round(r, 4) for r in getattr(result, "rewards", [])]
    values = {"accuracy": round(result.accuracy, 4), "n": result.n, "seed": seed, "difficulty": difficulty}
    return {**values, "rewards": rewards} if len(rewards) == result.n else values


def mean_accuracy(accuracy: dict[str, Figure], tasks: list[str] | None = None) -> float | None:
    values = [f.values["accuracy"] for t, f in accuracy.items()
              if (tasks is None or t in tasks) and isinstance(f.values.get("accuracy"), (int, float))]
    return sum(values) / len(values) if values else None


def speed_contexts(speed: dict[str, Figure]) -> list[int]:
    """The measured context sizes, ascending (items that are not integers are skipped)."""
    return sorted(int(k) for k in speed if str(k).isdigit())
