"""`qwenlab compare`: every variant in one table, plots, and a recommendation, from measured figures only.

Inputs are model/adapter folders, folders holding them, recipe run folders (their variants.json
names every model of the run, nano included) and merge-search folders (merge_search.json).
Outputs in one folder: compare.md (PNG plots beside it), compare.html (self-contained, plots
inlined as base64) and compare.json (the rows).
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from qwenlab.text_table import format_table
from qwenlab.variants.listing import (Variant, describe_variant, find_variants, is_variant_folder, short_origin,
                                      size_text, summary_row, warn_if_incomplete_run)
from qwenlab.report.matching import match_accuracy
from qwenlab.stats import paired_comparison
from qwenlab.variants.results import accuracy_figures, latest_all
from qwenlab.checkpoint.reader import read_json_object
from qwenlab.errors import QwenlabError
from qwenlab.model.info import human_bytes, human_count

RUN_VARIANTS_FILE = "variants.json"
SEARCH_FILE = "merge_search.json"


@dataclass
class Comparison:
    rows: list[dict]
    tasks: list[str]
    contexts: list[int]
    common_tasks: list[str]  # measured for every variant that has accuracy: the mean and the recommendation use these
    sweeps: list[dict] = field(default_factory=list)  # {title, parameter, points: [(x, {task: acc}, name)]}
    searches: list[dict] = field(default_factory=list)  # merge_search.json contents
    recommendation: str = ""
    notes: list[str] = field(default_factory=list)
    plots: list[tuple[str, Path]] = field(default_factory=list)  # (caption, PNG), once written


# ---- inputs -------------------------------------------------------------------------------


def expand_inputs(paths: list[str | Path]) -> tuple[list[Variant], list[dict], dict[str, str]]:
    """(variants, merge searches, display names) from the command line's paths."""
    variants: list[Variant] = []
    searches: list[dict] = []
    names: dict[str, str] = {}
    for raw in paths:
        path = Path(raw)
        if str(raw) != "nano" and path.is_dir() and (path / SEARCH_FILE).is_file():
            searches.append(read_json_object(path / SEARCH_FILE))
            best = path / "best"
            if is_variant_folder(best):
                variants.append(describe_variant(best))
            continue
        if str(raw) != "nano" and path.is_dir() and (path / RUN_VARIANTS_FILE).is_file():
            warn_if_incomplete_run(path)
            for name, folder in read_json_object(path / RUN_VARIANTS_FILE).items():
                if not isinstance(folder, str):
                    raise QwenlabError(f"{path / RUN_VARIANTS_FILE}: '{name}': expected a folder path, got {folder!r}")
                variant = describe_variant(folder)
                names[str(variant.path.resolve())] = name
                variants.append(variant)
            continue
        variants.extend(find_variants([raw]))
    unique = {}
    for variant in variants:
        unique.setdefault(variant.path.resolve(), variant)
    if not unique and not searches:
        raise QwenlabError("nothing to compare: no model, adapter, run or merge-search folder given")
    return list(unique.values()), searches, names


def build_comparison(paths: list[str | Path], names: dict[str, str] | None = None,
                     accuracy_where: dict | None = None) -> Comparison:
    """names: optional display names by resolved folder path (a recipe's model names). accuracy_where:
    optional {"difficulty": d, "seed": s} that compared accuracy figures must have (a recipe's own setting)."""
    variants, searches, found_names = expand_inputs(paths)
    names = {**found_names, **{str(Path(k).resolve()): v for k, v in (names or {}).items()}}
    rows = []
    for variant in variants:
        row = summary_row(variant, latest_all(variant.path))
        row["name"] = names.get(str(variant.path.resolve()), row["name"])
        row["from"] = short_origin(variant, names)
        row["lineage"] = variant.lineage
        rows.append(row)
    _disambiguate(rows)
    match_notes = _use_matched_accuracy(rows, variants, accuracy_where)
    tasks = sorted({t for r in rows for t in r["tasks"]})
    measured = [r for r in rows if r["tasks"]]
    common = [t for t in tasks if all(t in r["tasks"] for r in measured)]
    contexts = sorted({c for r in rows for c in r["speed"]})
    comparison = Comparison(rows, tasks, contexts, common, searches=searches)
    comparison.sweeps = merge_sweeps(rows)
    comparison.notes = match_notes + measurement_notes(rows, tasks)
    if common != tasks:
        shared = ", ".join(common) or "none"
        comparison.notes.append(f"the mean is over the tasks every measured variant shares: {shared}.")
    comparison.recommendation = recommend(rows, common)
    return comparison


def _use_matched_accuracy(rows: list[dict], variants: list[Variant], where: dict | None) -> list[str]:
    """Replace each row's accuracy by the figures matched across variants (report/matching.py)."""
    figures = {row["name"]: accuracy_figures(variant.path) for row, variant in zip(rows, variants)}
    matched, notes = match_accuracy(figures, where)
    for row in rows:
        mine = matched[row["name"]]
        row["tasks"] = {t: m.accuracy for t, m in mine.items()}
        row["task_n"] = {t: m.n for t, m in mine.items()}
        row["task_interval"] = {t: (round(m.low, 4), round(m.high, 4)) for t, m in mine.items()}
        row["task_rewards"] = {t: m.rewards for t, m in mine.items()}
        row["task_setting"] = {t: list(m.setting) for t, m in mine.items()}
        row["mean_accuracy"] = sum(row["tasks"].values()) / len(row["tasks"]) if row["tasks"] else None
    return notes


def _disambiguate(rows: list[dict]) -> None:
    seen: dict[str, int] = {}
    for row in rows:
        seen[row["name"]] = seen.get(row["name"], 0) + 1
    for row in rows:
        if seen[row["name"]] > 1:
            row["name"] = f"{Path(row['path']).parent.name}/{row['name']}"


def measurement_notes(rows: list[dict], tasks: list[str]) -> list[str]:
    notes = []
    for task in tasks:
        ns = {r["task_n"].get(task) for r in rows if task in r["tasks"]}
        if len(ns) > 1:
            notes.append(f"{task}: variants were measured on different numbers of instances ({sorted(ns)}).")
    missing = [r["name"] for r in rows if not r["tasks"]]
    if missing:
        notes.append(f"accuracy not measured for: {', '.join(missing)}.")
    no_speed = [r["name"] for r in rows if not r["speed"]]
    if no_speed:
        notes.append(f"speed not measured for: {', '.join(no_speed)}.")
    return notes


# ---- merge-parameter sweeps ---------------------------------------------------------------


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list):
        if all(isinstance(v, dict) and "model" in v for v in value):  # models: [{model, parameters}]
            out = {}
            for v in value:
                out.update(_flatten(v.get("parameters") or {}, f"{prefix}[{Path(str(v['model'])).name}]"))
            return out
        return {prefix: json.dumps(value)}
    return {prefix: value}


def merge_sweeps(rows: list[dict]) -> list[dict]:
    """Merges of the same inputs with the same method that differ in exactly one numeric parameter."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        lineage = row.get("lineage") or {}
        if lineage.get("kind") != "merge":
            continue
        inputs = tuple(sorted(i.get("sha256") or i.get("path") for i in lineage.get("inputs", [])))
        groups.setdefault((lineage.get("method"), inputs), []).append(row)
    sweeps = []
    for (method, _), members in groups.items():
        if len(members) < 2:
            continue
        flat = [_flatten((m["lineage"].get("config") or {}).get("parameters") or {}) |
                _flatten({"models": (m["lineage"].get("config") or {}).get("models") or []}) for m in members]
        keys = set().union(*flat)
        varying = [k for k in sorted(keys) if len({json.dumps(f.get(k), default=str) for f in flat}) > 1]
        if len(varying) != 1 or not all(isinstance(f.get(varying[0]), (int, float)) for f in flat):
            continue
        key = varying[0]
        points = sorted(((f[key], m["tasks"], m["name"]) for f, m in zip(flat, members)), key=lambda p: p[0])
        sweeps.append({"title": f"{method} merges: accuracy vs {key}", "parameter": key, "points": points})
    return sweeps


# ---- the recommendation -------------------------------------------------------------------


def _mean(row: dict, tasks: list[str]) -> float | None:
    values = [row["tasks"][t] for t in tasks if row["tasks"].get(t) is not None]
    return sum(values) / len(values) if len(values) == len(tasks) and tasks else None


def paired_rewards(a: dict, b: dict, tasks: list[str]) -> tuple[list[float], list[float]] | None:
    """Both rows' per-instance rewards over `tasks`, instance by instance (None if either lacks them)."""
    xs, ys = [], []
    for task in tasks:
        x, y = a.get("task_rewards", {}).get(task), b.get("task_rewards", {}).get(task)
        if x is None or y is None or len(x) != len(y):
            return None
        xs += x
        ys += y
    return xs, ys


def recommend(rows: list[dict], tasks: list[str]) -> str:
    """Which variant to ship: the best mean accuracy over the tasks every measured variant shares, with
    its size and speed; each claim against another variant comes from a paired test on the same prompts."""
    common = [t for t in tasks if all(t in r["tasks"] for r in rows if r["tasks"])]  # tasks every variant shares
    scored = [(r, _mean(r, common)) for r in rows]
    scored = [(r, m) for r, m in scored if m is not None]
    if not scored:
        return "No recommendation: no variant has measured task accuracy (run `qwenlab eval`)."
    best, best_mean = max(scored, key=lambda x: (x[1], -x[0]["deploy_bytes"]))
    instances = sum(best["task_n"].get(t) or 0 for t in common)
    text = (f"**Ship `{best['name']}`**: the best mean accuracy, {best_mean:.3f} over {len(common)} task(s) "
            f"({', '.join(common)}; {instances} prompts), {human_bytes(best['deploy_bytes'])} on disk")
    if best["decode_tokens_per_s"] is not None:
        text += f", {best['decode_tokens_per_s']:.1f} tokens/s decode at a {best['speed_context']}-token context"
    text += "."
    beaten, tied, unpaired = [], [], []
    for row, mean in scored:
        if row is best:
            continue
        pair = paired_rewards(row, best, common)
        if pair is None:
            unpaired.append(f"`{row['name']}` ({mean:.3f})")
            continue
        test = paired_comparison(*pair)
        claim = (f"`{row['name']}` ({test.difference:+.3f}, 95% CI {test.low:+.3f} to {test.high:+.3f}, "
                 f"p = {test.p_value:.2g})")
        (beaten if test.significant() and test.difference > 0 else tied).append((row, claim))
    if beaten:
        text += (" It is better than " + ", ".join(c for _, c in beaten) +
                 " (paired sign test on the same prompts, p < 0.05).")
    if tied:
        text += (" Not distinguishable from it on these prompts: " + ", ".join(c for _, c in tied) +
                 " (paired sign test, p >= 0.05)")
        lighter = min((r for r, _ in tied), key=lambda r: r["deploy_bytes"])
        if lighter["deploy_bytes"] < best["deploy_bytes"]:
            text += (f"; of these, `{lighter['name']}` is smaller ({human_bytes(lighter['deploy_bytes'])}) and "
                     "would do as well within the test's power")
        text += "."
    if unpaired:
        text += (" Not tested against it (no per-instance rewards recorded, re-run `qwenlab eval`): "
                 + ", ".join(unpaired) + ".")
    return text


# ---- tables -------------------------------------------------------------------------------


def main_table(c: Comparison, markdown: bool = True) -> str:
    ctx = _reference_context(c.rows)
    mean = "mean" if c.common_tasks == c.tasks else f"mean of {len(c.common_tasks)}"
    headers = ["variant", "kind", "made from", "size", "params", "dtype", *c.tasks, mean,
               "ppl", f"tok/s@{ctx}" if ctx else "tok/s", f"TTFT@{ctx}" if ctx else "TTFT", "peak RSS"]
    rows = []
    for r in c.rows:
        speed = r["speed"].get(ctx) if ctx else None
        rows.append([
            r["name"], r["kind"], r["from"],
            size_text(r), human_count(r["parameters"]) if r["parameters"] else "-", r["dtype"],
            *[_accuracy_cell(r, t, markdown) for t in c.tasks], _num(_mean(r, c.common_tasks), ".3f"),
            _num(r["perplexity"], ".2f"), _num((speed or {}).get("decode_tokens_per_s"), ".1f") +
            (f" ({r['speed_dtype']})" if speed and r["speed_dtype"] not in (None, "None", r["dtype"]) and
             not r["dtype"].startswith(str(r["speed_dtype"])) else ""),
            _num((speed or {}).get("ttft_s") and speed["ttft_s"] * 1000, ".0f", " ms"),
            human_bytes(r["peak_rss_bytes"]) if r["peak_rss_bytes"] else "-"])
    return format_table(headers, rows, markdown, align="llllrl" + "r" * (len(c.tasks) + 5))


def _accuracy_cell(row: dict, task: str, with_interval: bool) -> str:
    """'0.393 [0.35, 0.44]': the figure and its 95% Wilson interval."""
    value = row["tasks"].get(task)
    interval = row.get("task_interval", {}).get(task)
    if value is None or not with_interval or not interval:
        return _num(value, ".3f")
    return f"{value:.3f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def speed_table(c: Comparison, markdown: bool = True) -> str:
    """TTFT and decode tokens/s at every measured context: one row per variant and measured dtype."""
    headers = ["variant", "run as", *[f"TTFT@{x}" for x in c.contexts], *[f"tok/s@{x}" for x in c.contexts],
               "peak RSS"]
    rows = []
    for r in c.rows:
        for dtype, speed in r["speed_by_dtype"].items():
            peak = max((v.get("peak_rss_bytes") or 0 for v in speed.values()), default=0)
            rows.append([r["name"], dtype if dtype != "None" else "-",
                         *[_num(speed.get(x, {}).get("ttft_s") and speed[x]["ttft_s"] * 1000, ".1f", " ms")
                           for x in c.contexts],
                         *[_num(speed.get(x, {}).get("decode_tokens_per_s"), ".1f") for x in c.contexts],
                         human_bytes(peak) if peak else "-"])
    return format_table(headers, rows, markdown, align="ll" + "r" * (len(headers) - 2)) if rows else ""


def search_table(search: dict, markdown: bool = True) -> str:
    pareto = search.get("pareto") or []
    if not pareto:
        return ""
    params = list(pareto[0]["params"])
    axes = list(pareto[0]["objectives"])
    rows = [[p["trial"], *[_num(p["params"][k], ".3f") for k in params], *[_num(p["objectives"][a], ".3f")
                                                                            for a in axes]] for p in pareto]
    return format_table(["trial", *params, *axes], rows, markdown, align="r" * (1 + len(params) + len(axes)))


def _num(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def _reference_context(rows: list[dict]) -> int | None:
    """The largest context every variant with speed figures was measured at (else the largest of any)."""
    measured = [set(r["speed"]) for r in rows if r["speed"]]
    if not measured:
        return None
    common = set.intersection(*measured)
    return max(common) if common else max(set.union(*measured))


# ---- plots --------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(c: Comparison, path: Path) -> Path | None:
    rows = [r for r in c.rows if r["tasks"]]
    if not rows:
        return None
    plt = _pyplot()
    groups = c.tasks + (["mean"] if len(c.common_tasks) > 1 else [])
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(rows) / 3)), 4))
    for i, r in enumerate(rows):
        values = [r["tasks"].get(t) for t in c.tasks] + ([_mean(r, c.common_tasks)] if len(c.common_tasks) > 1 else [])
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None], width,
               label=r["name"])
        mark_unmeasured_and_zero(ax, xs, values)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per task")
    ax.legend(fontsize=8, ncols=min(4, len(rows)))
    return _save(fig, path)


def mark_unmeasured_and_zero(ax, xs: list[float], values: list[float | None]) -> None:
    """A missing bar and a bar of height 0 look alike: label both ("not measured" / "0")."""
    for x, value in zip(xs, values):
        if value is None:
            ax.text(x, 0.02, "not measured", rotation=90, ha="center", va="bottom", fontsize=7, color="0.45")
        elif value == 0:
            ax.text(x, 0.01, "0", ha="center", va="bottom", fontsize=7)


def plot_speed_vs_size(c: Comparison, path: Path) -> Path | None:
    ctx = _reference_context(c.rows)
    points = [(r["deploy_bytes"], r["speed"][ctx]["decode_tokens_per_s"], r["name"]) for r in c.rows
              if ctx in r["speed"] and r["speed"][ctx].get("decode_tokens_per_s") is not None]
    if not points:
        return None
    unit, scale = next((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("bytes", 1))
                       if max(p[0] for p in points) >= s)
    points = [(x / scale, y, name) for x, y, name in points]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    for x, y, name in points:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"size on disk, adapters with their base ({unit})")
    ax.set_ylabel(f"decode tokens/s at {ctx}-token context")
    ax.set_title("Speed vs size")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_ttft(c: Comparison, path: Path) -> Path | None:
    rows = [r for r in c.rows if any(v.get("ttft_s") is not None for v in r["speed"].values())]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        xs = [x for x in sorted(r["speed"]) if r["speed"][x].get("ttft_s") is not None]
        ax.plot(xs, [r["speed"][x]["ttft_s"] * 1000 for x in xs], marker="o", label=r["name"])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("TTFT per context")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep(sweep: dict, tasks: list[str], path: Path) -> Path | None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p[0] for p in sweep["points"]]
    for task in tasks:
        ys = [p[1].get(task) for p in sweep["points"]]
        if any(y is not None for y in ys):
            ys = [math.nan if y is None else y for y in ys]
            ax.plot(xs, ys, marker="o", alpha=0.6, label=task)
    means = [_mean({"tasks": p[1]}, tasks) for p in sweep["points"]]
    if len(tasks) > 1 and all(m is not None for m in means):
        ax.plot(xs, means, marker="s", color="black", linewidth=2, label="mean")
    ax.set_xlabel(sweep["parameter"])
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(sweep["title"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_search(search: dict, path: Path) -> Path | None:
    trials = [t for t in search.get("trials", []) if t.get("objective") is not None]
    if not trials:
        return None
    plt = _pyplot()
    params = list(trials[0]["params"])
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5), squeeze=False)
    pareto = {p["trial"] for p in search.get("pareto", [])}
    for ax, name in zip(axes[0], params):
        ax.scatter([t["params"][name] for t in trials], [t["objective"] for t in trials],
                   c=["tab:red" if t["trial"] in pareto else "tab:blue" for t in trials], s=18)
        ax.set_xlabel(name)
        ax.set_ylabel("mean accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle(f"merge search ({search.get('method')}): trials, Pareto front in red")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---- documents ----------------------------------------------------------------------------


def write_comparison(paths: list[str | Path], out: str | Path, title: str = "qwenlab compare",
                     names: dict[str, str] | None = None, accuracy_where: dict | None = None
                     ) -> tuple[Comparison, dict[str, Path]]:
    """Write compare.md, compare.html, compare.json and the PNG plots into `out`; returns them and their paths."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QwenlabError(f"{out}: exists and is not a folder; --out needs a folder for the comparison files")
    c = build_comparison(paths, names, accuracy_where)  # before creating `out`: bad inputs leave nothing behind
    out.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[str, Path]] = []
    for caption, plot, name in (("Accuracy per task", plot_accuracy, "accuracy.png"),
                                ("Speed vs size", plot_speed_vs_size, "speed_vs_size.png"),
                                ("Time to first token per context", plot_ttft, "ttft.png")):
        made = plot(c, out / name)
        if made:
            plots.append((caption, made))
    for i, sweep in enumerate(c.sweeps):
        plots.append((sweep["title"], plot_sweep(sweep, c.common_tasks, out / f"sweep_{i}.png")))
    for i, search in enumerate(c.searches):
        made = plot_search(search, out / f"search_{i}.png")
        if made:
            plots.append((f"Merge search {i + 1}", made))
    c.plots = plots
    files = {"markdown": out / "compare.md", "html": out / "compare.html", "json": out / "compare.json"}
    files["markdown"].write_text(comparison_markdown(c, plots, title))
    files["html"].write_text(comparison_html(c, plots, title))
    rows = [{k: v for k, v in r.items() if k != "lineage"} for r in c.rows]
    files["json"].write_text(json.dumps({"rows": rows, "tasks": c.tasks, "contexts": c.contexts,
                                         "recommendation": c.recommendation, "notes": c.notes,
                                         "searches": c.searches}, indent=2, default=str) + "\n")
    files.update({p.stem: p for _, p in plots})
    return c, files


def comparison_markdown(c: Comparison, plots: list[tuple[str, Path]], title: str, heading: str = "#",
                        image_prefix: str = "") -> str:
    parts = [f"{heading} {title}", c.recommendation, f"{heading}# All variants", main_table(c)]
    speed = speed_table(c)
    if speed:
        parts += [f"{heading}# Speed per context", speed]
    for i, search in enumerate(c.searches):
        parts += [f"{heading}# Merge search {i + 1}: {search.get('method')}", search_summary(search)]
        table = search_table(search)
        if table:
            parts += ["Pareto front:", table]
    if plots:
        parts += [f"{heading}# Plots"] + [f"![{caption}]({image_prefix}{path.name})" for caption, path in plots]
    if c.notes:
        parts += [f"{heading}# Notes"] + ["\n".join(f"- {n}" for n in c.notes)]
    parts.append("Figures are the measurements recorded in each variant's measurements.jsonl, matched on task, "
                 "difficulty and seed across variants; brackets hold 95% Wilson intervals; '-' means not measured.")
    return "\n\n".join(parts) + "\n"


def search_summary(search: dict) -> str:
    best = search.get("best") or {}
    return (f"{len(search.get('trials', []))} trials ({search.get('sampler')}), objective: {search.get('objective')}"
            f"; best trial {best.get('trial')} with {_num(best.get('objective'), '.3f')} at "
            f"`{json.dumps({k: round(v, 4) for k, v in best.get('params', {}).items()})}`.")


def _html_table(markdown_table: str) -> str:
    lines = [line for line in markdown_table.splitlines() if line.strip()]
    if len(lines) < 2:
        return ""

    def cells(line):
        return [html.escape(c.strip().replace("\\|", "|")) for c in line.strip().strip("|").split(" | ")]

    head = "".join(f"<th>{c}</th>" for c in cells(lines[0]))
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in cells(line)) + "</tr>" for line in lines[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def comparison_html(c: Comparison, plots: list[tuple[str, Path]], title: str) -> str:
    recommendation = html.escape(c.recommendation)
    recommendation = recommendation.replace("**", "")
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p class='rec'>{recommendation}</p>",
             "<h2>All variants</h2>", _html_table(main_table(c))]
    speed = speed_table(c)
    if speed:
        parts += ["<h2>Speed per context</h2>", _html_table(speed)]
    for i, search in enumerate(c.searches):
        parts += [f"<h2>Merge search {i + 1}: {html.escape(str(search.get('method')))}</h2>",
                  f"<p>{html.escape(search_summary(search))}</p>", _html_table(search_table(search))]
    for caption, path in plots:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if c.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in c.notes) + "</ul>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child"
             "{text-align:left}.rec{background:#eef6ee;padding:.8em;border-left:4px solid #4a4}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
