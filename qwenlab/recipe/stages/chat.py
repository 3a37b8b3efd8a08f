"""Stage `chat`: a few sample chats, to show what the model says."""

from typing import Literal

from pydantic import PositiveInt

from qwenlab.loading import load
from qwenlab.model.generate import GenerationConfig, generate
from qwenlab.recipe.stages.params import StageParams


class Params(StageParams):
    MODEL_FIELDS = ("model",)
    model: str = "nano"
    prompts: list[str] = ["What is 12 + 7?"]
    dtype: Literal["fp32", "bf16"] = "fp32"
    max_new_tokens: PositiveInt = 32


def run(ctx, params: Params) -> tuple[dict, str]:
    name, prompts = params.model, params.prompts
    model, tokenizer, _ = load(ctx.model_path(name), params.dtype)
    completions = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=params.max_new_tokens),
                           chat=True)
    rows = [{"prompt": p, "reply": c.text} for p, c in zip(prompts, completions)]
    for row in rows:
        print(f"  user: {row['prompt']}\n  {name}: {row['reply']}")
    lines = [f"| user | {name} |", "|---|---|"] + [f"| {r['prompt']} | {r['reply'].replace('|', '/')} |" for r in rows]
    return {"chats": rows}, f"## Sample chats with {name}\n\n" + "\n".join(lines)
