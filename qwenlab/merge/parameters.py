"""Per-tensor parameter values: filters, gradients across layers, and precedence, as mergekit resolves them.

A setting is a scalar, a gradient (a list of numbers interpolated across the layers of a slice),
or a list of `{filter, value}` entries where the first whose filter is a substring of the tensor
name wins. Lookup goes source (per model) > slice > global and stops at the first level that
gives a value; shared parameters (t, normalize, lambda, ...) skip the per-model level.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any, Iterable

from pydantic import TypeAdapter, ValidationError

from qwenlab.errors import QwenlabError
from qwenlab.merge.config import ConditionalValue, MergeConfig
from qwenlab.merge.methods.spec import MergeMethod, Parameter

log = logging.getLogger(__name__)


@lru_cache(maxsize=None)
def _adapter(kind) -> TypeAdapter:
    return TypeAdapter(kind)


def validate_value(parameter: Parameter, value: Any) -> Any:
    """Coerce as mergekit does (pydantic: "0.5" -> 0.5, "true" -> True)."""
    return _adapter(parameter.type).validate_python(value)


def gradient_value(values: list, t: float) -> Any:
    """Interpolate a gradient at t ∈ [0, 1]: s = t·(m−1), i = ⌊s⌋, (1−(s−i))·v[i] + (s−i)·v[min(i+1, m−1)].

    Non-numeric lists (booleans) pick v[⌊t·(m−1)⌋] instead.
    """
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    fraction = scaled - low
    return (1 - fraction) * values[low] + fraction * values[high]


def evaluate_setting(parameter: Parameter, setting: Any, tensor_name: str, t: float) -> Any:
    """The value of one setting for one tensor at layer position t, or None when no filter matches."""
    if isinstance(setting, ConditionalValue):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return validate_value(parameter, setting)
    if not isinstance(setting, list) or not setting:
        return None
    if not any(isinstance(entry, ConditionalValue) for entry in setting):
        values = [validate_value(parameter, v) for v in setting]
        return validate_value(parameter, gradient_value(values, t))
    for entry in setting:
        if entry.filter in (None, "*") or entry.filter in tensor_name:
            return evaluate_setting(parameter, entry.value, tensor_name, t)
    return None


def resolve(parameter: Parameter, scopes: Iterable[dict | None], tensor_name: str, t: float,
            model: str | None = None) -> Any:
    """The first value the scopes (highest precedence first) give, else the default."""
    for scope in scopes:
        if scope and parameter.name in scope:
            value = evaluate_setting(parameter, scope[parameter.name], tensor_name, t)
            if value is not None:
                return value
    if parameter.required:
        where = f"model {model}, " if model else ""
        raise QwenlabError(f"parameters.{parameter.name}: required but not set ({where}tensor {tensor_name}); "
                           "set it under the model's parameters or in the global parameters")
    return None if parameter.default is None else validate_value(parameter, parameter.default)


# ---- checking the settings before any work -------------------------------------------------
def _numeric_leaves(setting: Any, path: str) -> Iterable[tuple[str, Any]]:
    if isinstance(setting, ConditionalValue):
        yield from _numeric_leaves(setting.value, path + ".value")
    elif isinstance(setting, list):
        for index, entry in enumerate(setting):
            yield from _numeric_leaves(entry, f"{path}[{index}]")
    else:
        yield path, setting


def check_setting(parameter: Parameter, setting: Any, path: str) -> None:
    """Every leaf must validate and lie in the parameter's range (interpolation stays inside it)."""
    for leaf_path, leaf in _numeric_leaves(setting, path):
        try:
            value = validate_value(parameter, leaf)
        except ValidationError:
            kind = {bool: "true or false", int: "a whole number"}.get(parameter.type, "a number")
            raise QwenlabError(f"{leaf_path}: expected {kind}, got {leaf!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not parameter.in_range(value):
            raise QwenlabError(f"{leaf_path}: {parameter.name} = {leaf} is outside {parameter.allowed_range()}")


def parameter_scopes(config: MergeConfig) -> Iterable[tuple[str, dict, bool]]:
    """(YAML path, parameters dict, is_per_model) for every `parameters:` block in the config."""
    if config.parameters:
        yield "parameters", config.parameters, False
    for index, entry in enumerate(config.models or []):
        if entry.parameters:
            yield f"models[{index}].parameters", entry.parameters, True
    for index, output_slice in enumerate(config.slices or []):
        if output_slice.parameters:
            yield f"slices[{index}].parameters", output_slice.parameters, False
        for source_index, source in enumerate(output_slice.sources):
            if source.parameters:
                yield f"slices[{index}].sources[{source_index}].parameters", source.parameters, True


def check_parameters(method: MergeMethod, config: MergeConfig) -> None:
    """Unknown parameter names and out-of-range values fail, naming the YAML path."""
    for path, settings, per_model in parameter_scopes(config):
        for name, setting in settings.items():
            parameter = method.parameter(name)
            if parameter is None:
                known = ", ".join(method.parameter_names()) or "none"
                raise QwenlabError(f"{path}.{name}: unknown parameter for {method.name} (expected one of: {known})")
            check_setting(parameter, setting, f"{path}.{name}")
            if per_model and parameter.scope == "shared":
                # mergekit reads these only from slice and global parameters; say so, do the same.
                log.warning("%s.%s is ignored: %s is read from the global (or slice) parameters only",
                            path, name, name)
