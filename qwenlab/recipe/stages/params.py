"""What every stage's parameters share: a pydantic model that forbids unknown fields, so a typo in a
recipe is a one-line error naming the stage and the field before anything runs (runner.load_recipe).

A stage's Params lists the fields that name models (MODEL_FIELDS), which the runner checks against
the models the recipe defines and the earlier stages register (`outputs()`), and the fields that hold
evaluation settings shared by many stages (EvalParams).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import pydantic
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt

from qwenlab.errors import QwenlabError


def _known_task(spelling: str) -> str:
    """A task spelling that opens (built-in name, reasoning_gym:, jsonl:, mix:; paths from the working folder)."""
    from qwenlab.tasks import get_task

    try:
        get_task(spelling)
    except QwenlabError as e:
        raise ValueError(str(e)) from None
    return spelling


TaskSpelling = Annotated[str, AfterValidator(_known_task)]


class StageParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    label: str | None = None  # the stage's heading and id in figures.json (default: the stage's name)

    def model_names(self) -> list[str]:
        names = []
        for field in self.MODEL_FIELDS:
            value = getattr(self, field)
            names += value if isinstance(value, list) else [value] if value else []
        return names

    def outputs(self) -> list[str]:
        """Model names this stage registers for later stages."""
        return []


class EvalParams(StageParams):
    tasks: list[TaskSpelling] | None = None
    n: PositiveInt = 100
    seed: NonNegativeInt = 0
    difficulty: PositiveInt | None = None
    dtype: Literal["fp32", "bf16"] = "fp32"
    title: str | None = None


def named_output(alias: str = "as"):
    """The `as` field (a Python keyword): the name a stage registers its result under."""
    return Field(alias=alias)


def validate_params(params_class: type[StageParams], raw, where: str) -> StageParams:
    """The stage's Params, or one line naming the first bad field and what was expected."""
    if raw is not None and not isinstance(raw, dict):
        raise QwenlabError(f"{where}: expected a mapping of parameters")
    try:
        return params_class.model_validate(raw or {})
    except pydantic.ValidationError as e:
        error = e.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(f.alias or name for name, f in params_class.model_fields.items())
            raise QwenlabError(f"{where}.{field}: unknown parameter (allowed: {allowed})") from None
        raise QwenlabError(f"{where}.{field}: {error['msg']}"
                           + (f", got {error['input']!r}" if error["type"] != "missing" else "")) from None
