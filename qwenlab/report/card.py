"""`qwenlab card`: a Hugging Face model card (README.md) for a variant, from facts and measured figures only.

Facts come from the folder (config.json, tensor headers, file sizes, lineage.json, training or
merge config); figures from measurements.jsonl. A figure that was never measured is written as
"not measured", never estimated. The YAML header is built with huggingface_hub's ModelCardData
(base_model, base_model_relation, license, library_name, tags, model-index for measured accuracy)
and the whole card is parsed back with huggingface_hub.ModelCard before it is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from qwenlab.text_table import format_table
from qwenlab.variants.listing import Variant, describe_variant, display_name, lineage_chain
from qwenlab.variants.results import Figure, latest_all, latest_by_dtype, mean_accuracy, speed_contexts
from qwenlab.checkpoint.reader import read_json_object
from qwenlab.errors import QwenlabError
from qwenlab.model.info import describe, human_bytes, human_count

NOT_MEASURED = "not measured"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RELATION = {"adapter": "adapter", "merge": "merge", "quantized": "quantized", "trained": "finetune",
            "export": "quantized"}
LIBRARY = {"adapter": "peft", "quantized": "qwenlab", "export": "gguf"}


# ---- facts --------------------------------------------------------------------------------


def hub_id_of(folder: Path) -> str | None:
    """A Hub id recorded in a folder's config (transformers writes `_name_or_path`), if it looks like one."""
    for name, key in (("config.json", "_name_or_path"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, str) and _HUB_ID.match(value) and not Path(value).exists():
            return value
    return None


def root_of(variant: Variant) -> dict:
    return lineage_chain(variant)[-1]


def license_of(root: Path) -> str | None:
    """The license in the root base's own README.md, if it has a card; nano ships under qwenlab's license."""
    if display_name(root) == "nano":
        return "apache-2.0"
    readme = root / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            try:
                return (yaml.safe_load(text.split("---", 2)[1]) or {}).get("license")
            except yaml.YAMLError:
                return None
    return None


def file_tree(variant: Variant) -> str:
    total = sum(size for _, size in variant.files)
    lines = [f"{variant.path.name}/  ({human_bytes(total)} in {len(variant.files)} files)"]
    for i, (name, size) in enumerate(variant.files):
        branch = "└── " if i == len(variant.files) - 1 else "├── "
        lines.append(f"{branch}{name}  ({human_bytes(size)})")
    return "\n".join(lines)


# ---- sections -----------------------------------------------------------------------------


def _summary(variant: Variant, chain: list[dict]) -> str:
    root = chain[-1]
    if variant.kind == "base" or len(chain) == 1:
        what = f"a Qwen2-architecture {variant.kind} model"
    else:
        what = (f"a {variant.kind} variant ({variant.method or 'unknown method'}) of `{root['name']}`, "
                f"{len(chain) - 1} step(s) from it")
    params = f"{human_count(variant.parameters)} parameters" if variant.parameters else "parameters unknown"
    return (f"`{variant.name}` is {what}: {params}, {variant.dtype}, {human_bytes(variant.size_bytes)} on disk. "
            "Every figure below was measured (the command, date and machine are given with it); figures "
            f"that were not measured say \"{NOT_MEASURED}\".")


def lineage_section(chain: list[dict]) -> str:
    rows = []
    for step, item in enumerate(reversed(chain)):
        inputs = ", ".join(f"{i['role']}: {i['name']}" + (f" (sha256 {i['sha256'][:12]})" if i.get("sha256") else "")
                           for i in item["inputs"]) or "-"
        rows.append([step, f"`{item['name']}`", item["kind"], item["method"] or "-", inputs])
    table = format_table(["step", "model", "kind", "method", "made from (content hash)"], rows, markdown=True)
    return "## Lineage\n\nFrom the base (step 0) to this model, as recorded in each folder's lineage.json.\n\n" + table


def architecture_section(variant: Variant) -> str:
    if variant.config is None:
        return f"## Architecture\n\n{NOT_MEASURED}: the base model of this adapter was not found."
    info = describe(variant.config)
    arch = info["architecture"]
    rows = [["layers", arch["layers"]], ["attention heads (Q / KV)", f"{arch['query_heads']} / {arch['kv_heads']}"],
            ["head dim", arch["head_dim"]], ["hidden size", arch["hidden"]],
            ["MLP intermediate size", arch["intermediate"]], ["vocabulary", arch["vocab"]],
            ["context length", arch["context"]], ["RoPE theta", f"{arch['rope_theta']:g}"],
            ["tied embeddings", "yes" if arch["tied_embeddings"] else "no"],
            ["RMSNorm eps", f"{variant.config.rms_norm_eps:g}"],
            ["parameters (config)", f"{human_count(info['parameters']['total'])} total, "
                                    f"{human_count(info['parameters']['non_embedding'])} non-embedding"]]
    if variant.kind == "adapter":
        rows.append(["adapter parameters", human_count(variant.parameters or 0)])
    prefix = "The base model's architecture (this adapter applies to it). " if variant.kind == "adapter" else ""
    return ("## Architecture\n\n" + prefix + "Qwen2 decoder: RMSNorm, grouped-query attention with RoPE and "
            "q/k/v bias, SwiGLU MLP.\n\n" + format_table(["", "value"], rows, markdown=True))


def hyperparameters_section(variant: Variant) -> str:
    parts = ["## Hyperparameters"]
    lineage = variant.lineage or {}
    config = lineage.get("config") or {}
    if variant.kind == "merge" and config:
        parts += ["Merge configuration (mergekit YAML):", "```yaml\n" + yaml.safe_dump(config, sort_keys=False).strip()
                  + "\n```"]
    elif config:
        label = {"adapter": "Training configuration", "trained": "Training configuration",
                 "quantized": "Quantization"}.get(variant.kind, "Configuration")
        parts += [f"{label} (from lineage.json):", "```yaml\n" + yaml.safe_dump(config, sort_keys=False).strip()
                  + "\n```"]
    quant = variant.config.extra.get("quantization") if variant.config is not None else None
    if quant and variant.kind != "adapter":
        parts += ["Quantization section of config.json:", "```json\n" + json.dumps(quant, indent=2) + "\n```"]
    adapter_config = variant.path / "adapter_config.json"
    if adapter_config.is_file():
        keep = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern")
        data = {k: v for k, v in read_json_object(adapter_config).items() if k in keep}
        parts += ["LoRA (adapter_config.json):", "```json\n" + json.dumps(data, indent=2) + "\n```"]
    generation = variant.path / "generation_config.json"
    if generation.is_file():
        parts += ["Generation defaults (generation_config.json):", "```json\n" + generation.read_text().strip()
                  + "\n```"]
    if len(parts) == 1:
        parts.append("No training, merge or quantization configuration recorded (no lineage.json config).")
    return "\n\n".join(parts)


def _when(figure: Figure) -> str:
    return figure.time[:10] if figure.time else "?"


def benchmarks_section(variant: Variant, figures: dict[str, dict[str, Figure]]) -> str:
    parts = ["## Benchmarks"]
    speed = figures.get("speed", {})
    if speed_contexts(speed):
        rows, notes = [], []
        for dtype, by_ctx in latest_by_dtype(variant.path).items():
            for ctx in speed_contexts(by_ctx):
                figure = by_ctx[str(ctx)]
                rows.append([dtype if dtype != "None" else "-", ctx,
                             _fmt(figure.values.get("ttft_s"), 1000, ".1f", " ms"),
                             _fmt(figure.values.get("decode_tokens_per_s"), 1, ".1f"),
                             _fmt(figure.values.get("peak_rss_bytes"), None, ""), _when(figure)])
                setup = ", ".join(f"{k} {v}" for k, v in figure.setup.items()) or "setup not recorded"
                machine = (f" on {figure.machine.get('cpu')} ({figure.machine.get('cores')} logical cores)"
                           if figure.machine.get("cpu") else "")
                note = f"Measured{machine} with `{figure.command or 'an unrecorded command'}` ({setup})."
                if note not in notes:
                    notes.append(note)
        parts += ["### Speed", " ".join(notes),
                  format_table(["run as", "context (tokens)", "TTFT", "decode tokens/s", "peak RSS", "measured"],
                               rows, markdown=True, align="lrrrrl")]
    else:
        parts += ["### Speed", f"TTFT and tokens/s: {NOT_MEASURED} (run `qwenlab bench {variant.path}`)."]
    accuracy = figures.get("accuracy", {})
    if accuracy:
        rows = [[task, f"{f.values.get('accuracy'):.3f}", f.values.get("n", "?"), f.values.get("seed", "-"),
                 _difficulty(f), f.setup.get("dtype", "?"), _when(f)] for task, f in sorted(accuracy.items())]
        mean = mean_accuracy(accuracy)
        parts += ["### Accuracy", "Greedy decoding on seeded, verifiable task instances (`qwenlab eval`); the "
                  "same seed gives the same instances for every variant.",
                  format_table(["task", "accuracy", "n", "seed", "difficulty", "dtype", "measured"], rows,
                               markdown=True, align="lrrrrll"), f"Mean over {len(rows)} task(s): {mean:.3f}. {_commands(accuracy)}"]
    else:
        parts += ["### Accuracy", f"Task accuracy: {NOT_MEASURED} (run `qwenlab eval {variant.path}`)."]
    perplexity = figures.get("perplexity", {})
    if perplexity:
        rows = [[item, _fmt(f.values.get("perplexity"), 1, ".3f"), _fmt(f.values.get("bits_per_byte"), 1, ".4f"),
                 f.values.get("tokens", "?"), f"{f.values.get('max_length', '?')}/{f.values.get('stride', '?')}",
                 _when(f)] for item, f in sorted(perplexity.items())]
        parts += ["### Perplexity", format_table(["data", "perplexity", "bits/byte", "tokens", "window/stride",
                                                  "measured"], rows, markdown=True, align="lrrrrl"),
                  _commands(perplexity)]
    else:
        parts += ["### Perplexity", f"Perplexity: {NOT_MEASURED}."]
    peak = max((f.values.get("peak_rss_bytes") or 0 for f in speed.values()), default=0)
    memory = f"peak RSS while generating: {human_bytes(peak)} (measured)" if peak else \
        f"peak RSS while generating: {NOT_MEASURED}"
    parts += ["### Memory", f"Weights on disk: {human_bytes(variant.weight_bytes)}; {memory}."]
    return "\n\n".join(parts)


def _commands(figures: dict[str, Figure]) -> str:
    commands = sorted({f.command for f in figures.values() if f.command})
    return ("Measured with " + ", ".join(f"`{c}`" for c in commands) + ".") if commands else ""


def _fmt(value, scale, spec: str, suffix: str = "") -> str:
    if value is None:
        return NOT_MEASURED
    if scale is None:
        return human_bytes(value)
    return format(value * scale, spec) + suffix


def variants_section(variant: Variant, variants: list[str | Path], names: dict[str, str] | None = None) -> str:
    from qwenlab.report.compare import build_comparison, main_table

    comparison = build_comparison([*variants], names)
    return ("## Variants\n\nMeasured side by side (the same tasks, seeds and contexts where the figures allow; "
            "'-' means not measured).\n\n" + main_table(comparison) +
            "\n\n## Choosing which model to use\n\n" + comparison.recommendation)


def usage_section(variant: Variant) -> str:
    path = variant.path
    run = f"qwenlab chat {path}" if variant.kind != "adapter" else \
        f"qwenlab serve {variant.base or 'BASE'} --adapter {variant.name}={path}"
    lines = ["## How to use", "```bash", run, f"qwenlab eval {path} --tasks arithmetic", "```"]
    if variant.kind not in ("adapter", "quantized", "export"):
        lines += ["With transformers:", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"model = AutoModelForCausalLM.from_pretrained(\"{path}\")",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{path}\")", "```"]
    elif variant.kind == "adapter":
        lines += ["With PEFT:", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM",
                  f"base = AutoModelForCausalLM.from_pretrained(\"{variant.base or 'BASE'}\")",
                  f"model = PeftModel.from_pretrained(base, \"{path}\")", "```"]
    return "\n".join(lines)


def limitations_section(variant: Variant, figures: dict[str, dict[str, Figure]]) -> str:
    items = []
    accuracy = figures.get("accuracy", {})
    if accuracy:
        smallest = min((f.values.get("n") or 0) for f in accuracy.values())
        items.append(f"Accuracy was measured on as few as {smallest} instances per task: differences below a few "
                     "points may be noise.")
    else:
        items.append("No task accuracy was measured: quality is unknown.")
    if not figures.get("speed"):
        items.append("No speed was measured: latency and throughput on your hardware are unknown.")
    if variant.kind == "quantized":
        items.append("Weight-only quantization: outputs differ from the float model; compare accuracy before use.")
    if variant.kind == "merge":
        items.append("A merge of other models: it inherits their limitations and may behave unlike any of them.")
    if variant.parameters and variant.parameters < 50_000_000:
        items.append("A very small model: it handles only the narrow tasks it was trained on and produces "
                     "unreliable text otherwise.")
    items.append("Not evaluated for safety, bias or factuality; do not use for decisions about people.")
    return "## Limitations\n\n" + "\n".join(f"- {item}" for item in items)


# ---- the card -----------------------------------------------------------------------------


def _difficulty(figure: Figure) -> str:
    value = figure.values.get("difficulty", figure.setup.get("difficulty"))
    return "task default" if value is None else str(value)


def card_metadata(variant: Variant, chain: list[dict], figures: dict[str, dict[str, Figure]],
                  base_model: str | None, license: str | None) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    root = Path(chain[-1]["path"])
    base_model = base_model or (hub_id_of(root) if len(chain) > 1 or variant.kind != "base" else None)
    tags = ["qwenlab", "qwen2", variant.kind]
    if variant.method:
        tags.append(re.sub(r"[^\w.-]+", "-", variant.method))
    if variant.kind == "merge":
        tags += ["merge", "mergekit"]
    if variant.kind == "adapter":
        tags += ["lora", "peft"]
    results = [EvalResult(task_type="text-generation", dataset_type=f"qwenlab/{task}", dataset_name=task,
                          metric_type="accuracy", metric_value=f.values["accuracy"],
                          metric_name=f"{task} accuracy (greedy, n={f.values.get('n')}, difficulty {_difficulty(f)})")
               for task, f in sorted(figures.get("accuracy", {}).items())
               if isinstance(f.values.get("accuracy"), (int, float))]
    data = ModelCardData(base_model=base_model, license=license or license_of(root) or "unknown",
                         library_name=LIBRARY.get(variant.kind, "transformers"), tags=list(dict.fromkeys(tags)),
                         pipeline_tag="text-generation", model_name=variant.name, eval_results=results or None)
    if base_model and variant.kind in RELATION:
        data.base_model_relation = RELATION[variant.kind]
    return data.to_yaml()


def build_card(model: str | Path, *, variants: list[str | Path] | None = None, base_model: str | None = None,
               license: str | None = None, names: dict[str, str] | None = None) -> str:
    """The README.md text for `model`; `variants` (folders) adds a side-by-side table and a recommendation.

    names: display names by folder path (a recipe's model names) for that table.
    """
    variant = describe_variant(model)
    chain = lineage_chain(variant)
    figures = latest_all(variant.path)
    sections = [
        f"---\n{card_metadata(variant, chain, figures, base_model, license)}\n---",
        f"# {variant.name}",
        _summary(variant, chain),
        lineage_section(chain),
        architecture_section(variant),
        hyperparameters_section(variant),
        "## Files\n\n```\n" + file_tree(variant) + "\n```",
        benchmarks_section(variant, figures),
    ]
    if variants:
        sections.append(variants_section(variant, variants, names))
    sections += [usage_section(variant), limitations_section(variant, figures),
                 "---\n*Card written by `qwenlab card` from the folder's files and measurements.jsonl.*"]
    return "\n\n".join(sections) + "\n"


def validate_card(text: str):
    """Parse with huggingface_hub's ModelCard (raises on bad metadata); returns the ModelCard."""
    from huggingface_hub import ModelCard

    try:
        return ModelCard(text, ignore_metadata_errors=False)
    except Exception as e:  # huggingface_hub raises ValueError / yaml errors with its own wording
        raise QwenlabError(f"model card failed huggingface_hub's ModelCard validation: {e}") from None


def write_card(model: str | Path, out: str | Path | None = None, **options) -> Path:
    """Write README.md into the model folder (or `out`), after validating it."""
    from qwenlab.variants.results import _inside_package

    variant = describe_variant(model)
    text = build_card(variant.path, **options)
    validate_card(text)
    if out is None:
        if _inside_package(variant.path):
            raise QwenlabError(f"{variant.path} is inside the qwenlab package; pass --out FILE for its card")
        out = variant.path / "README.md"
    out = Path(out)
    if out.is_dir():
        out = out / "README.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
