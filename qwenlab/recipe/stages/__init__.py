"""Recipe stages: one file each, one line here. A stage is `run(ctx, params) -> (figures, markdown)`."""

from qwenlab.recipe.stages import chat, eval, info

STAGES = {
    "info": info.run,
    "eval": eval.run,
    "chat": chat.run,
}
