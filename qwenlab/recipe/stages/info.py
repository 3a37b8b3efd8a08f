"""Stage `info`: the architecture table and parameter counts of a model."""

from qwenlab.checkpoint import open_checkpoint
from qwenlab.model.info import describe, format_description


def run(ctx, params: dict) -> tuple[dict, str]:
    name = params.get("model", "nano")
    checkpoint = open_checkpoint(ctx.model_path(name))
    info = describe(checkpoint.config)
    text = format_description(info, name)
    print(text)
    return info, f"## Model: {name}\n\n```\n{text}\n```"
