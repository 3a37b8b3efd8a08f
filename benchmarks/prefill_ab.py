"""TTFT of one quantized model with long prompts on the VNNI kernel and on the bf16 (AMX) path, alternated in one
process (the two paths share everything else, so the machine's drift hits both alike).

    python benchmarks/prefill_ab.py MODEL_FOLDER [PROMPT_TOKENS]

Prints the median (min-max) TTFT of 5 runs of each after one warm-up, generate() with a 4-token answer.
"""
import sys, time, torch, statistics
from qwenlab.loading import load
from qwenlab.quant import native
from qwenlab.model.generate import GenerationConfig, generate_token_ids
torch.set_num_threads(2)
model = load(sys.argv[1]).model
n = int(sys.argv[2]) if len(sys.argv) > 2 else 512
prompt = torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(0)).tolist()
res = {"vnni": [], "amx-bf16": []}
for r in range(6):
    for p in ("vnni", "amx-bf16"):
        native.force_prefill_path(p)
        config = GenerationConfig(max_new_tokens=4, max_context=len(prompt) + 4)
        t = time.perf_counter(); it = generate_token_ids(model, [prompt], config, set()); next(iter(it)); res[p].append(time.perf_counter() - t)
        for _ in it: pass
print(sys.argv[1].split("/")[-1][:20], n, {p: f"{statistics.median(v[1:])*1e3:.0f} ms ({min(v[1:])*1e3:.0f}-{max(v[1:])*1e3:.0f})" for p, v in res.items()})
