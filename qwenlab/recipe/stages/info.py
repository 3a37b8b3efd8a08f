"""Stage `info`: the architecture table and parameter counts of a model."""

from qwenlab.checkpoint import open_checkpoint
from qwenlab.model.info import describe, format_description
from qwenlab.recipe.stages.params import StageParams


class Params(StageParams):
    MODEL_FIELDS = ("model",)
    model: str = "nano"


def run(ctx, params: Params) -> tuple[dict, str]:
    name = params.model
    checkpoint = open_checkpoint(ctx.model_path(name))
    info = describe(checkpoint.config)
    text = format_description(info, name)
    print(text)
    return info, f"## Model: {name}\n\n```\n{text}\n```"
