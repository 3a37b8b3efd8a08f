"""Rollouts: G sampled completions per task instance, scored by the task's own verifier.

Generation runs on the project's engine (qwenlab.model.generate: batched, KV cache) with the policy
adapter switched on. A rollout keeps the sampled token ids when it was made here. A rollout that
came from another peer carries text only: `trained_completion` re-tokenises it, cuts it to the
trained length and decodes exactly those ids again, and that text is what gets scored. So the
reward is always the reward of the tokens trained on (a foreign completion cannot earn reward with
text past the cut, which training never sees).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qwenlab.adapters import active_adapters
from qwenlab.model.generate import GenerationConfig, generate
from qwenlab.tasks import EVAL_SEED_LIMIT, TaskInstance, score_instance
from qwenlab.tasks import generate as generate_task
from qwenlab.tasks.rng import TaskRng
from qwenlab.train.grpo.policy import POLICY

# Training instances use seeds from here up: never an evaluation seed (those are < EVAL_SEED_LIMIT),
# and apart from nano's own training seeds (10,000,000 + i, i < a few hundred thousand).
TRAIN_SEED_LOW = 100_000_000
TRAIN_SEED_HIGH = 2**31 - 1
assert TRAIN_SEED_LOW >= EVAL_SEED_LIMIT


_ANSWER_BLOCK = re.compile(r"<answer>.*?</answer>", re.DOTALL)


def has_answer_block(completion: str) -> float:
    """1.0 if the completion holds an <answer>...</answer> block (the optional format reward), else 0.0."""
    return 1.0 if _ANSWER_BLOCK.search(completion) else 0.0


@dataclass
class Rollout:
    """One task instance and its group of completions. `source` is "local" or the sending peer's id."""

    task: str
    seed: int
    difficulty: int
    prompt: str
    completions: list[str]
    rewards: list[float]
    finish_reasons: list[str]  # "stop" (the model ended it) or "length" (cut at max_new_tokens)
    completion_ids: list[list[int]] | None = None  # sampled ids (local rollouts only)
    source: str = "local"
    claimed_rewards: list[float] | None = field(default=None, repr=False)  # what a sender said, never used

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / len(self.rewards) if self.rewards else 0.0


@dataclass(frozen=True)
class TrainedCompletion:
    ids: list[int]  # exactly the tokens trained on (before the end token a "stop" completion gets)
    text: str  # those ids decoded, control tokens included as text: what is scored
    cut: bool  # the completion was longer than the trained length (so it did not stop: "length")
    control: bool  # it holds a special token (<|im_end|>, <|im_start|>, ...): scored 0


def trained_completion(tokenizer, text: str, max_tokens: int) -> TrainedCompletion:
    """The tokens a foreign completion is trained on, and the text those tokens decode to."""
    ids = tokenizer.encode(text)
    cut = len(ids) > max_tokens
    ids = ids[:max_tokens]
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    # A special token decodes to nothing when skipped; an honest peer's decoded text never holds one.
    control = decoded != tokenizer.decode(ids, skip_special_tokens=True)
    return TrainedCompletion(ids, decoded, cut, control)


def draw_instances(tasks: list[str], n: int, key: str, difficulty: int | None = None) -> list[TaskInstance]:
    """n training instances, deterministic in `key` (e.g. "grpo:0:17" for seed 0, step 17).

    Tasks rotate through `tasks` from a drawn starting point, so n instances are one question each
    of n different tasks (SAPO's multi-task rounds) when n <= len(tasks), and every task is drawn
    equally often over many calls; seeds are drawn in [TRAIN_SEED_LOW, 2^31) so a training instance
    is never an evaluation instance.
    """
    rng = TaskRng(key)
    start = rng.integer(0, len(tasks) - 1) if len(tasks) > 1 else 0
    out = []
    for i in range(n):
        task = tasks[(start + i) % len(tasks)]
        seed = rng.integer(TRAIN_SEED_LOW, TRAIN_SEED_HIGH)
        out.append(generate_task(task, seed, difficulty))
    return out


def score_completions(task: str, seed: int, difficulty: int, completions: list[str]) -> list[float]:
    """Rewards from our own verifier: the instance is rebuilt from (task, seed, difficulty)."""
    instance = generate_task(task, seed, difficulty)
    return [score_instance(instance, text) for text in completions]


def generate_rollouts(model, tokenizer, instances: list[TaskInstance], num_generations: int,
                      config: GenerationConfig, use_policy: bool = True) -> list[Rollout]:
    """Sample `num_generations` completions per instance in one batch and score them."""
    prompts = [instance.prompt for instance in instances for _ in range(num_generations)]
    with active_adapters(model, POLICY if use_policy else None):
        completions = generate(model, tokenizer, prompts, config, chat=True)
    rollouts = []
    for index, instance in enumerate(instances):
        group = completions[index * num_generations:(index + 1) * num_generations]
        texts = [c.text for c in group]
        rollouts.append(Rollout(
            task=instance.task, seed=instance.seed, difficulty=instance.difficulty, prompt=instance.prompt,
            completions=texts, rewards=[score_instance(instance, t) for t in texts],
            finish_reasons=[c.finish_reason for c in group], completion_ids=[list(c.token_ids) for c in group]))
    return rollouts
