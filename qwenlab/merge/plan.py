"""The merge plan: every output tensor with its input tensors and resolved parameters.

Built the way mergekit plans (so the same YAML gives the same tensors): `models` becomes one
slice over all layers (the base appended when not listed); each slice's layer i gets
t = i/(n−1) (1 if n = 1) for gradients; embed_tokens comes from the first slice's models and
model.norm / lm_head from the last slice's, both at t = 0. Nothing is read but headers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qwenlab.checkpoint.names import layer_tensor_shapes
from qwenlab.errors import QwenlabError
from qwenlab.merge.config import MergeConfig, SliceSource
from qwenlab.merge.methods import MergeMethod, get_method
from qwenlab.merge.parameters import check_parameters, resolve
from qwenlab.merge.sources import TensorSource
from qwenlab.checkpoint.config import Qwen2Config

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


@dataclass
class PlannedTensor:
    name: str
    inputs: list[tuple[str, str]]  # (model, tensor name in that model); the base first if the method uses it
    params: dict
    layer: int | None = None  # output layer index; None for embed_tokens, model.norm, lm_head
    t: float = 0.0


@dataclass
class MergePlan:
    method: MergeMethod
    config: MergeConfig
    output_config: Qwen2Config
    tensors: list[PlannedTensor] = field(default_factory=list)
    slices: list = field(default_factory=list)  # the normalized slices, for the dry-run table
    solved: dict | None = None  # solves_layers methods: every decoder linear's weight, solved on first use


@dataclass
class _Slice:
    sources: list[SliceSource]
    base: str | None
    parameters: dict | None
    path: str  # YAML path, for errors


def normalized_slices(config: MergeConfig, sources: dict[str, TensorSource]) -> list[_Slice]:
    """`models:` as one slice over every layer, the base appended if not listed (mergekit's rule)."""
    if config.slices:
        return [_Slice(s.sources, s.base_model or config.base_model, s.parameters, f"slices[{i}]")
                for i, s in enumerate(config.slices)]
    listed = [SliceSource(model=m.model, layer_range=(0, sources[m.model].config.num_hidden_layers),
                          parameters=m.parameters) for m in config.models]
    if config.base_model and config.base_model not in [m.model for m in config.models]:
        layers = sources[config.base_model].config.num_hidden_layers
        listed.append(SliceSource(model=config.base_model, layer_range=(0, layers)))
    return [_Slice(listed, config.base_model, None, "models")]


def check_slice(method: MergeMethod, piece: _Slice, sources: dict[str, TensorSource]) -> None:
    for index, source in enumerate(piece.sources):
        start, end = source.layer_range
        layers = sources[source.model].config.num_hidden_layers
        if not 0 <= start < end <= layers:
            raise QwenlabError(f"{piece.path}.sources[{index}].layer_range: [{start}, {end}] is out of bounds for "
                               f"{source.model} ({layers} layers; expected 0 <= start < end <= {layers})")
    lengths = {s.model: s.layer_range[1] - s.layer_range[0] for s in piece.sources}
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"{n} in {model}" for model, n in lengths.items())
        what = "the models have different numbers of layers" if piece.path == "models" else \
            "every source of a slice must span the same number of layers"
        raise QwenlabError(f"{piece.path}: {what} ({listing}); use slices to pick layers")
    models = [s.model for s in piece.sources]
    uses_base = method.base != "ignored"
    has_base = uses_base and piece.base in models
    if method.base == "required" and not has_base:
        raise QwenlabError(f"{piece.path}: {method.name} needs a base_model that is one of its models "
                           f"(base_model: {piece.base or 'not set'})")
    count = len(models) - int(has_base)
    if count < method.min_models or (method.max_models is not None and count > method.max_models):
        expected = (f"exactly {method.min_models}" if method.min_models == method.max_models
                    else f"at least {method.min_models}" if method.max_models is None
                    else f"{method.min_models} to {method.max_models}")
        other = " other than the base" if has_base else ""
        raise QwenlabError(f"{piece.path}: {method.name} takes {expected} model(s){other}, got {count}")


def ordered_sources(method: MergeMethod, piece: _Slice) -> tuple[list[SliceSource], str | None]:
    """The slice's sources with the base first when the method uses one; and that base."""
    if method.base == "ignored" or piece.base not in [s.model for s in piece.sources]:
        return list(piece.sources), None
    base = [s for s in piece.sources if s.model == piece.base][:1]
    return base + [s for s in piece.sources if s is not base[0]], piece.base


def resolve_params(method: MergeMethod, config: MergeConfig, piece: _Slice, ordered: list[SliceSource],
                   base: str | None, out_name: str, in_names: list[str], t: float) -> dict:
    """Shared parameters from slice > global; per-model ones from source > slice > global."""
    general = (piece.parameters, config.parameters)
    params = {}
    for parameter in method.parameters:
        if parameter.scope == "shared":
            params[parameter.name] = resolve(parameter, general, out_name, t)
            continue
        values = []
        for source, in_name in zip(ordered, in_names):
            if parameter.scope == "non_base" and base is not None and source.model == base:
                continue
            own = [s.parameters for s in piece.sources if s.model == source.model]
            values.append(resolve(parameter, (*own, *general), in_name, t, model=source.model))
        params[parameter.name] = values
    return params


def plan_tensor(method: MergeMethod, config: MergeConfig, piece: _Slice, name: str, in_names: list[str] | None,
                layer: int | None, t: float) -> PlannedTensor:
    """in_names: the tensor's name in each (ordered) source; None: `name` in every one of them."""
    ordered, base = ordered_sources(method, piece)
    in_names = in_names or [name] * len(ordered)
    params = resolve_params(method, config, piece, ordered, base, name, in_names, t)
    return PlannedTensor(name, [(s.model, n) for s, n in zip(ordered, in_names)], params, layer, t)


def layer_names(config: Qwen2Config, index: int) -> list[str]:
    """The tensor names of layer `index` (names depend on the index only, not on the config)."""
    return list(layer_tensor_shapes(config, index))


def build_plan(config: MergeConfig, sources: dict[str, TensorSource]) -> MergePlan:
    method = get_method(config.merge_method)
    check_parameters(method, config)
    slices = normalized_slices(config, sources)
    for piece in slices:
        check_slice(method, piece, sources)
    donor = sources[config.base_model or config.model_paths()[0]]
    total_layers = sum(p.sources[0].layer_range[1] - p.sources[0].layer_range[0] for p in slices)
    output = donor.config.replace(num_hidden_layers=total_layers)
    plan = MergePlan(method, config, output, slices=slices)
    plan.tensors.append(plan_tensor(method, config, slices[0], EMBED, None, None, 0.0))
    out_layer = 0
    for piece in slices:
        ordered, _ = ordered_sources(method, piece)
        length = piece.sources[0].layer_range[1] - piece.sources[0].layer_range[0]
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            inputs = [layer_names(output, s.layer_range[0] + offset) for s in ordered]
            for position, out_name in enumerate(layer_names(output, out_layer)):
                in_names = [names[position] for names in inputs]
                plan.tensors.append(plan_tensor(method, config, piece, out_name, in_names, out_layer, t))
            out_layer += 1
    post = [NORM] if output.tie_word_embeddings else [NORM, LM_HEAD]
    for name in post:
        plan.tensors.append(plan_tensor(method, config, slices[-1], name, None, None, 0.0))
    return plan
