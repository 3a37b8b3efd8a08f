"""Stage `chat`: a few sample chats, to show what the model says."""

from qwenlab.cli.model_commands import load_for_generation
from qwenlab.model.generate import GenerationConfig, generate


def run(ctx, params: dict) -> tuple[dict, str]:
    name = params.get("model", "nano")
    prompts = params.get("prompts") or ["What is 12 + 7?"]
    model, tokenizer, _ = load_for_generation(ctx.model_path(name), params.get("dtype", "fp32"))
    completions = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=int(params.get("max_new_tokens", 32))),
                           chat=True)
    rows = [{"prompt": p, "reply": c.text} for p, c in zip(prompts, completions)]
    for row in rows:
        print(f"  user: {row['prompt']}\n  {name}: {row['reply']}")
    lines = [f"| user | {name} |", "|---|---|"] + [f"| {r['prompt']} | {r['reply'].replace('|', '/')} |" for r in rows]
    return {"chats": rows}, f"## Sample chats with {name}\n\n" + "\n".join(lines)
