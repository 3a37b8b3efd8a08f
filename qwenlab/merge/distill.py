"""Distillation after a layer-by-layer solve (regmean_sequential's `distill_steps`).

The solve fits each linear to every input's activations at once, and one linear cannot hold all of them: the
residuals add up to the last layer. Here the merged model's decoder linears take a few Adam steps on

    Σᵢ KL(pᵢ ‖ p_merged) / (number of inputs)

over the answer tokens of each input's own data, pᵢ being input i's next-token distribution there: the merged
model learns to answer as each input answers on its own data, the data the solve used. Nothing else moves
(embeddings, norms, biases). The answers in the data are context only: the targets are the inputs' own
distributions, so a model merged with itself starts at KL 0 and stays put (Adam's step is 0 where the gradient is).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

# Rows of one input's data per step. On nano's specialists, 200 steps of 16 rows kept 93-98% of every skill on
# validation, as 200 of 32 did (93-100%), in half the time (docs/merge.md).
ROWS = 16
# Adam's default eps (1e-8) is the size of these gradients: with it, dividing the loss by 3 moved arithmetic by 5
# points. Far below them, the steps do not depend on the loss's scale.
EPS = 1e-12
CACHE_BYTES = 512 * 2**20  # teachers' log-probs kept for every step below this; recomputed above it


def answer_positions(mask: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """[B, T] bool: the positions whose next token is an answer token (starts[r]: row r's first answer token;
    mask: the real tokens, right-padded)."""
    lengths = mask.sum(1)
    positions = torch.arange(mask.shape[1])
    first = torch.tensor([max(s - 1, 0) for s in starts])
    return (positions >= first[:, None]) & (positions < (lengths - 1)[:, None])


def _log_probs(model, tokens: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    hidden = model.final_hidden(tokens)[where]
    # clamped: a probability that underflows to 0 would make 0 · (-inf) a NaN in the KL
    return F.log_softmax(F.linear(hidden, model.head_weight).float(), -1).clamp_min(-1e4)


def distill_linears(merged, inputs: list[tuple], steps: int, lr: float, progress: bool = True,
                    label: str = "merge") -> dict:
    """Train merged's decoder linear weights in place; inputs: (teacher model, [(tokens, answer positions)]) per
    input. The KL on all of the data is measured before and after, and if it did not fall, the weights it got are
    put back: the distillation never returns a merge further from its inputs than the one it was given (Adam's
    first steps are lr-sized whatever the gradient, which can throw a near-exact solve off). A measurement is a
    pass over all the data (about 3.5 s on nano's three inputs), hence only two.
    Returns {"kl": [(step, KL on all the data)], "kept_step": steps, or 0 where the start was put back}."""
    chunks = [[(tokens[r:r + ROWS], where[r:r + ROWS]) for tokens, where in batches
               for r in range(0, tokens.shape[0], ROWS) if where[r:r + ROWS].any()] for _, batches in inputs]
    chunks = [(teacher, items) for (teacher, _), items in zip(inputs, chunks) if items]
    if not chunks or steps <= 0:
        return {"kl": [], "kept_step": 0}
    weights = [p for name, p in merged.named_parameters() if ".layers." in name and name.endswith("proj.weight")]
    for p in merged.parameters():
        p.requires_grad_(False)
    cache, budget = {}, [CACHE_BYTES]  # (input, chunk) -> the input's own log-probs there, within CACHE_BYTES

    @torch.no_grad()
    def target(i: int, j: int) -> torch.Tensor:  # input i's own log-probs on its chunk j
        if (i, j) in cache:
            return cache[(i, j)]
        log_probs = _log_probs(chunks[i][0], *chunks[i][1][j])
        if log_probs.numel() * 4 <= budget[0]:
            cache[(i, j)] = log_probs
            budget[0] -= log_probs.numel() * 4
        return log_probs

    def kl(i: int, j: int) -> torch.Tensor:  # mean over the chunk's answer tokens
        own, teacher = _log_probs(merged, *chunks[i][1][j]), target(i, j)
        return (teacher.exp() * (teacher - own)).sum(-1).mean()

    @torch.no_grad()
    def data_kl() -> float:  # mean over inputs of the mean over all their answer tokens
        total = 0.0
        for i, (_, items) in enumerate(chunks):
            sizes = [int(where.sum()) for _, where in items]
            total += sum(kl(i, j).item() * n for j, n in enumerate(sizes)) / sum(sizes)
        return total / len(chunks)

    history = [(0, data_kl())]
    saved = [p.detach().clone() for p in weights]
    bar = tqdm(range(1, steps + 1), desc=f"{label}: distilling", unit="step", disable=not progress, file=sys.stderr)
    with torch.enable_grad():
        for p in weights:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(weights, lr=lr, eps=EPS)
        try:
            for step in bar:
                optimizer.zero_grad(set_to_none=True)
                for i, (_, items) in enumerate(chunks):
                    (kl(i, (step - 1) % len(items)) / len(chunks)).backward()
                optimizer.step()
        finally:
            for p in weights:
                p.requires_grad_(False)
            bar.close()
    history.append((steps, data_kl()))
    better = history[-1][1] < history[0][1]
    if progress:
        print(f"{label}: KL to the inputs on their answers {history[0][1]:.4f} -> {history[-1][1]:.4f}"
              + ("" if better else " (no lower: the merge as solved is kept)"), file=sys.stderr)
    if better:
        return {"kl": history, "kept_step": steps}
    with torch.no_grad():
        for p, value in zip(weights, saved):
            p.copy_(value)
    return {"kl": history, "kept_step": 0}
