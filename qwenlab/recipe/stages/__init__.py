"""Recipe stages: one file each, one line here. A stage module has `Params` (a StageParams: its typed,
validated parameters) and `run(ctx, params) -> (figures, markdown)`."""

from qwenlab.recipe.stages import adapter_eval, chat, eval, info, train
from qwenlab.recipe.stages import card, compare
from qwenlab.recipe.stages import merge, quantize, swarm

STAGES = {
    "info": info,
    "eval": eval,
    "chat": chat,
    "train": train,
    "adapter_eval": adapter_eval,
    "compare": compare,
    "card": card,
    "swarm": swarm,
    "merge": merge,
    "quantize": quantize,
}


def run_stage(kind: str, ctx, params: dict) -> tuple[dict, str]:
    """One stage called directly (tests, notebooks): its parameters validated as a recipe's are."""
    from qwenlab.recipe.stages.params import validate_params

    return STAGES[kind].run(ctx, validate_params(STAGES[kind].Params, params, f"{kind} stage"))
