"""The dry-run report: inputs, output, and the resolved per-layer parameter table."""

from __future__ import annotations

from qwenlab.merge.plan import MergePlan, PlannedTensor
from qwenlab.merge.sources import TensorSource
from qwenlab.merge.tokenizer_source import vocabulary_hash
from qwenlab.text_table import format_table

GROUPS = ("self_attn", "mlp", "norm")


def _group(name: str) -> str:
    return next((g for g in GROUPS if g in name), "other")


def _format(value) -> str:
    if isinstance(value, list):
        return "/".join(_format(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _summary(values: list[str]) -> str:
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else "{" + ", ".join(distinct) + "}"


def _row(label: str, group: str, members: list[PlannedTensor], names: list[str]) -> list[str]:
    return [label, group] + [_summary([_format(t.params[n]) for t in members]) for n in names]


def parameter_table(plan: MergePlan) -> list[list[str]]:
    """One row per (output layer, tensor group); a cell shows {a, b} when tensors of the group differ."""
    names = [p.name for p in plan.method.parameters]
    rows = [["layer", "group", *names]]
    by_layer: dict[object, list[PlannedTensor]] = {}
    for planned in plan.tensors:
        by_layer.setdefault(planned.layer if planned.layer is not None else planned.name, []).append(planned)
    for key, members in by_layer.items():
        if not isinstance(key, int):
            rows.append(_row(key, "-", members, names))
            continue
        sources = ", ".join(f"{m}[{n.split('.')[2]}]" for m, n in members[0].inputs)
        for group in dict.fromkeys(_group(t.name) for t in members):
            rows.append(_row(f"{key} <- {sources}", group, [t for t in members if _group(t.name) == group], names))
    return rows


def describe_inputs(sources: dict[str, TensorSource]) -> str:
    rows = [["model", "layers", "hidden", "vocab rows", "tied", "dtype", "tokenizer"]]
    for name, source in sources.items():
        c = source.config
        vocab = vocabulary_hash(source.path)
        rows.append([name, str(c.num_hidden_layers), str(c.hidden_size), str(c.vocab_size),
                     "yes" if c.tie_word_embeddings else "no", c.torch_dtype, vocab[:12] if vocab else "-"])
    return format_table(rows[0], rows[1:])


def describe_plan(plan: MergePlan, sources: dict[str, TensorSource]) -> str:
    output = plan.output_config
    parameters = parameter_table(plan)
    lines = [
        f"merge_method: {plan.method.name}    base_model: {plan.config.base_model or '-'}",
        "",
        describe_inputs(sources),
        "",
        f"output: {output.num_hidden_layers} layers, {len(plan.tensors)} tensors, "
        f"tied embeddings: {'yes' if output.tie_word_embeddings else 'no'}",
        "",
        format_table(parameters[0], parameters[1:]),
    ]
    return "\n".join(lines)
