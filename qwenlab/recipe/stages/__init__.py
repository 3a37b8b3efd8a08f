"""Recipe stages: one file each, one line here. A stage is `run(ctx, params) -> (figures, markdown)`."""

from qwenlab.recipe.stages import adapter_eval, chat, eval, info, train
from qwenlab.recipe.stages import card, compare
from qwenlab.recipe.stages import merge, quantize, swarm

STAGES = {
    "info": info.run,
    "eval": eval.run,
    "chat": chat.run,
    "train": train.run,
    "adapter_eval": adapter_eval.run,
    "compare": compare.run,
    "card": card.run,
    "swarm": swarm.run,
    "merge": merge.run,
    "quantize": quantize.run,
}
