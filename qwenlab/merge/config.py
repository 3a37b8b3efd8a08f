"""The merge config: mergekit's YAML schema as a pydantic model, validated at the edge.

A bad config fails with one line naming the YAML path of the field and what was expected,
e.g. `merge config: models[1].parameters.weight: expected a number, a list of numbers, ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from qwenlab.errors import QwenlabError
from qwenlab.yaml_file import read_yaml

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class _Strict(BaseModel):
    # A misspelt key (e.g. `paramters`) must fail, not be silently ignored; a .nan or .inf weight
    # would write a model of NaNs without a word.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ConditionalValue(_Strict):
    """`{filter: self_attn, value: 0.5}`: the value for tensors whose name contains `filter`."""
    value: ScalarOrGradient
    filter: Optional[str] = None


# A scalar, a gradient (list of numbers interpolated across layers), or filtered values.
ParameterSetting = Union[ConditionalValue, list[ConditionalValue], ScalarOrGradient]
Parameters = Optional[dict[str, ParameterSetting]]


class ActivationData(_Strict):
    """What a data-aware method (regmean) runs a model on to measure its layers' inputs: built-in task
    instances (`task` or `tasks`), or a JSONL file of chats (`messages`) or `text` records. A qwenlab
    extension of mergekit's schema."""
    task: Optional[str] = None
    tasks: Optional[list[str]] = None
    file: Optional[str] = None
    n: int = 256  # examples (cycled through a shorter file)
    difficulty: Optional[int] = None
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> "ActivationData":
        if sum(x is not None for x in (self.task, self.tasks, self.file)) != 1:
            raise ValueError("give exactly one of task, tasks or file")
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks is empty")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        return self


class ModelInput(_Strict):
    model: str
    parameters: Parameters = None
    data: Optional[ActivationData] = None  # regmean only: the examples this model's layer inputs are measured on


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = None


class OutputSlice(_Strict):
    sources: list[SliceSource]
    base_model: Optional[str] = None
    residual_weight: Optional[float] = None  # accepted for mergekit compatibility; unused there too
    parameters: Parameters = None


class MergeConfig(_Strict):
    merge_method: str
    models: Optional[list[ModelInput]] = None
    slices: Optional[list[OutputSlice]] = None
    base_model: Optional[str] = None
    parameters: Parameters = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None  # "base", "union", or a model path
    chat_template: Optional[str] = None
    name: Optional[str] = None  # mergekit-multi's document name; ignored

    @model_validator(mode="after")
    def _models_or_slices(self) -> "MergeConfig":
        if bool(self.models) == bool(self.slices):
            raise ValueError("exactly one of 'models' or 'slices' must be given (and not empty)")
        for index, output_slice in enumerate(self.slices or []):
            if not output_slice.sources:
                raise ValueError(f"slices[{index}].sources is empty")
        listed = [entry.model for entry in self.models or []]
        for index, model in enumerate(listed):
            # The planner keys parameters by model path: a second entry would be merged as the first.
            if model in listed[:index]:
                raise ValueError(f"models[{index}].model: {model} is listed twice")
        return self

    def model_paths(self) -> list[str]:
        """Every model the config names, base first, each once, in config order."""
        paths = [self.base_model] if self.base_model else []
        for entry in self.models or []:
            paths.append(entry.model)
        for output_slice in self.slices or []:
            paths.extend([output_slice.base_model] if output_slice.base_model else [])
            paths.extend(source.model for source in output_slice.sources)
        return list(dict.fromkeys(paths))


_UNION_TAGS = ("ConditionalValue", "list[", "bool", "int", "float", "str", "tuple[", "function-")


def yaml_path(location: tuple) -> str:
    """('models', 1, 'parameters', 'weight', 'float') -> 'models[1].parameters.weight'."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not any(str(part).startswith(tag) for tag in _UNION_TAGS):
            path += ("." if path else "") + str(part)
    return path or "(top level)"


def _describe(error: dict) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    if "parameters" in [p for p in error["loc"] if isinstance(p, str)]:
        return ("expected a number, true/false, a list of numbers (a gradient), "
                "or a list of {filter, value} entries")
    return str(error["msg"]).lower()


def validation_message(error: ValidationError, source: str) -> str:
    """One line for the most specific of pydantic's errors (a union reports one per member)."""
    errors = error.errors()
    best = max(errors, key=lambda e: (e["type"] == "extra_forbidden", len(yaml_path(e["loc"]))))
    location = yaml_path(best["loc"])
    if location == "(top level)":
        return f"{source}: {_describe(best)}"
    return f"{source}: {location}: {_describe(best)}"


def load_merge_config(config: "MergeConfig | dict | str | Path") -> MergeConfig:
    """A MergeConfig from itself, a dict, or a YAML file path."""
    if isinstance(config, MergeConfig):
        return config
    source = "merge config"
    if isinstance(config, (str, Path)):
        source = str(config)
        config = read_yaml(config, "merge config file")
    if not isinstance(config, dict):
        raise QwenlabError(f"{source}: expected a mapping with merge_method and models or slices")
    try:
        return MergeConfig.model_validate(config)
    except ValidationError as e:
        raise QwenlabError(validation_message(e, source)) from None


def config_as_dict(config: MergeConfig) -> dict[str, Any]:
    return config.model_dump(exclude_none=True, mode="json")
