"""Seeded verifiable tasks: generation, determinism, difficulty, answer parsing and the registry."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter

import pytest

from qwenlab.errors import QwenlabError
from qwenlab.tasks import (
    DEFAULT_DIFFICULTY,
    EVAL_SEED_LIMIT,
    TASKS,
    TaskInstance,
    generate,
    get_task,
    sample_instances,
    score,
)

NUMBER_TASKS = ["arithmetic", "count_letter"]
WORD_TASKS = ["reverse", "sort_letters", "repeat"]
ARITHMETIC = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


def wrong_answer(task: str, expected: str) -> str:
    if task in NUMBER_TASKS:
        return str(int(expected) + 1)
    return expected + "z"


def difficulties(task: str) -> range:
    return range(1, get_task(task).MAX_DIFFICULTY + 1)


# --- every registered task -------------------------------------------------------------------

def test_registry_covers_the_four_skills():
    assert set(NUMBER_TASKS + WORD_TASKS) <= set(TASKS)
    for name, module in TASKS.items():
        assert module.NAME == name
        assert 1 <= DEFAULT_DIFFICULTY[name] <= module.MAX_DIFFICULTY


@pytest.mark.parametrize("task", list(TASKS))
def test_expected_scores_one_and_wrong_answer_zero(task):
    for difficulty in difficulties(task):
        for seed in range(30):
            instance = generate(task, seed, difficulty)
            assert isinstance(instance, TaskInstance)
            assert score(task, instance.expected, instance.expected) == 1.0
            assert score(task, f"The answer is {instance.expected}.", instance.expected) == 1.0
            assert score(task, wrong_answer(task, instance.expected), instance.expected) == 0.0
            assert score(task, "", instance.expected) == 0.0


@pytest.mark.parametrize("task", list(TASKS))
def test_instance_fields(task):
    instance = generate(task, 17, 3)
    assert (instance.task, instance.seed, instance.difficulty) == (task, 17, 3)
    assert instance.id == f"{task}-3-17"
    assert instance.prompt and instance.expected
    assert instance.prompt.isascii()
    with pytest.raises(AttributeError):
        instance.expected = "x"  # frozen


@pytest.mark.parametrize("task", list(TASKS))
def test_default_difficulty_is_used_when_none(task):
    assert generate(task, 5) == generate(task, 5, DEFAULT_DIFFICULTY[task])
    assert generate(task, 5, None).difficulty == DEFAULT_DIFFICULTY[task]


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("difficulty", [0, -1, 5, 2.0, True, "2"])
def test_bad_difficulty_is_a_user_error(task, difficulty):
    with pytest.raises(QwenlabError, match="difficulty must be an integer from 1 to 4"):
        generate(task, 0, difficulty)


@pytest.mark.parametrize("task", list(TASKS))
def test_bad_seed_is_a_user_error(task):
    with pytest.raises(QwenlabError, match="seed must be an integer"):
        generate(task, "0", 1)


# --- determinism -----------------------------------------------------------------------------

@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_and_difficulty_give_the_same_instance(task):
    for seed in range(20):
        for difficulty in difficulties(task):
            assert generate(task, seed, difficulty) == generate(task, seed, difficulty)
            assert get_task(task).generate(seed, difficulty) == generate(task, seed, difficulty)


@pytest.mark.parametrize("task", list(TASKS))
def test_different_seeds_give_mostly_different_instances(task):
    prompts = {generate(task, seed).prompt for seed in range(50)}
    assert len(prompts) >= 45


@pytest.mark.parametrize("task", list(TASKS))
def test_difficulty_is_part_of_the_seed(task):
    # the same seed at another difficulty is a fresh draw, not a stretched copy
    assert generate(task, 3, 1).prompt != generate(task, 3, 2).prompt


def test_instances_are_the_same_in_a_fresh_process_with_another_hash_seed():
    # peers rebuild instances from (task, seed, difficulty): nothing may depend on hash() salting
    code = ("from qwenlab.tasks import TASKS, generate\n"
            "print([generate(t, s, 2).prompt for t in TASKS for s in range(5)])")
    here = repr([generate(t, s, 2).prompt for t in TASKS for s in range(5)])
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": hash_seed, "PATH": ""})
        assert out.stdout.strip() == here


def test_pinned_instances_never_change():
    # A swarm mixes peers on different commits: changing what a seed generates breaks re-scoring.
    assert generate("arithmetic", 0, 2).prompt == "What is 71 + 70?"
    assert generate("reverse", 0, 2).prompt == "Reverse the word 'wwoz'."
    assert generate("sort_letters", 0, 2).prompt == "Sort the letters of 'ggpo' alphabetically."
    assert generate("count_letter", 0, 2).prompt == "How many times does the letter 'c' appear in 'teoamx'?"


# --- arithmetic ------------------------------------------------------------------------------

@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_arithmetic_difficulty_is_operand_digits_and_expected_is_right(difficulty):
    operators = Counter()
    for seed in range(200):
        instance = generate("arithmetic", seed, difficulty)
        a, op, b = ARITHMETIC.fullmatch(instance.prompt).groups()
        assert len(a) == len(b) == difficulty
        assert difficulty == 1 or not (a.startswith("0") or b.startswith("0"))
        want = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert instance.expected == str(want)
        operators[op] += 1
    assert set(operators) == {"+", "-", "*"}
    assert min(operators.values()) > 40  # roughly uniform


def test_arithmetic_produces_negative_results():
    assert any(generate("arithmetic", s, 2).expected.startswith("-") for s in range(100))


# --- word tasks ------------------------------------------------------------------------------

def _quoted(prompt: str) -> list[str]:
    return re.findall(r"'([a-z]+)'", prompt)


# task -> (its prompt for a word, its answer for that word)
WORD_TASK_FORMS = {
    "reverse": ("Reverse the word '{}'.", lambda word: word[::-1]),
    "sort_letters": ("Sort the letters of '{}' alphabetically.", lambda word: "".join(sorted(word))),
    "repeat": ("Repeat the word '{}'.", lambda word: word),
}


@pytest.mark.parametrize("task", list(WORD_TASK_FORMS))
@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_word_task_prompts_lengths_and_expected(task, difficulty):
    prompt, answer = WORD_TASK_FORMS[task]
    lengths = set()
    for seed in range(100):
        instance = generate(task, seed, difficulty)
        (word,) = _quoted(instance.prompt)
        assert instance.prompt == prompt.format(word)
        assert instance.expected == answer(word)
        lengths.add(len(word))
    assert lengths == {difficulty + 2, difficulty + 3}


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_count_letter_expected_and_spread_of_answers(difficulty):
    answers = Counter()
    for seed in range(300):
        instance = generate("count_letter", seed, difficulty)
        letter, word = _quoted(instance.prompt)
        assert len(letter) == 1 and difficulty + 3 <= len(word) <= difficulty + 4
        assert instance.expected == str(word.count(letter))
        answers[int(instance.expected)] += 1
    assert set(answers) == set(range(difficulty + 2))  # 0 .. d+1, each one seen


# --- parsing: numbers ------------------------------------------------------------------------

@pytest.mark.parametrize("completion", [
    "42", "42.", "The answer is 42.", "answer: 42", "Answer:42", "The answer is: 42", "ANSWER IS 42",
    "42.0", "  42\n", "**42**", "$42$", "\\boxed{42}",
    "37 + 5 = 42",                                     # last number
    "First 6 * 7 = 41... no, 6 * 7 = 42.",               # reasoning numbers, a different final one
    "The answer is 42, not 41.",                        # marker beats last number
    "I guessed answer: 40 at first. The answer is 42. Check: 40 + 2",  # the last marker counts
    "Qwen2.5 thinks it is 42",                          # digits glued to letters are not numbers
])
def test_number_completions_that_are_right(completion):
    assert score("arithmetic", completion, "42") == 1.0


@pytest.mark.parametrize("completion", [
    "41", "The answer is 41.", "420", "4.2", "42.5", "The answer is 42, no wait, the answer is 43",
    "42 + 1 = 43", "forty-two", "", "no idea", "The answer isn't 42, it is 41",
])
def test_number_completions_that_are_wrong(completion):
    assert score("arithmetic", completion, "42") == 0.0


@pytest.mark.parametrize("completion", ["-7", "The answer is -7.", "\u22127", "answer: \u22127", "3 - 10 = -7"])
def test_negative_numbers_ascii_and_unicode_minus(completion):
    assert score("arithmetic", completion, "-7") == 1.0
    assert score("arithmetic", completion, "7") == 0.0


def test_hyphen_between_digits_is_not_a_sign():
    assert score("arithmetic", "37-5", "5") == 1.0
    assert score("arithmetic", "37-5", "-5") == 0.0


@pytest.mark.parametrize("completion", ["1,234", "1234", "The answer is 1,234.", "answer: 1,234", "x = 1,234"])
def test_thousands_commas(completion):
    assert score("arithmetic", completion, "1234") == 1.0


def test_commas_that_are_not_thousands_separators():
    assert score("arithmetic", "1,2,3", "3") == 1.0        # a list: the last item
    assert score("arithmetic", "1,234,567", "1234567") == 1.0
    assert score("arithmetic", "-12,345,678", "-12345678") == 1.0


def test_count_letter_reads_a_sentence_answer():
    assert score("count_letter", "The letter 'a' appears 3 times in 'banana'.", "3") == 1.0
    assert score("count_letter", "three", "3") == 0.0


# --- parsing: words --------------------------------------------------------------------------

@pytest.mark.parametrize("completion", [
    "elppa", "elppa.", "'elppa'", "\"elppa\".", "ELPPA", "The answer is 'elppa'.", "Answer: Elppa!",
    "The reversed word is: elppa", "Reversing 'apple' gives \"elppa\".", "answer is elppa, from apple",
])
def test_word_completions_that_are_right(completion):
    assert score("reverse", completion, "elppa") == 1.0


@pytest.mark.parametrize("completion", [
    "apple", "elpp", "elppaa", "e l p p a", "elppa is the answer", "", "123",
])
def test_word_completions_that_are_wrong(completion):
    assert score("reverse", completion, "elppa") == 0.0


def test_sort_letters_parses_like_reverse():
    assert score("sort_letters", "Sorted: 'ABCD'.", "abcd") == 1.0
    assert score("sort_letters", "dcba -> abdc", "abcd") == 0.0


# --- registry --------------------------------------------------------------------------------

def test_unknown_task_names_the_known_ones():
    message = f"unknown task 'nope'; known tasks: {', '.join(TASKS)}"
    for call in (lambda: get_task("nope"), lambda: generate("nope", 0, 1), lambda: score("nope", "1", "1"),
                 lambda: sample_instances("nope", 3, seed=0)):
        with pytest.raises(QwenlabError) as error:
            call()
        assert str(error.value) == message
        assert "arithmetic, reverse, sort_letters, count_letter, repeat" in str(error.value)


@pytest.mark.parametrize("task", list(TASKS))
def test_sample_instances_deterministic_distinct_seeds(task):
    first = sample_instances(task, 200, seed=0)
    assert first == sample_instances(task, 200, seed=0)
    assert len(first) == 200 and len({i.seed for i in first}) == 200
    assert all(0 <= i.seed < EVAL_SEED_LIMIT for i in first)
    assert all(i.difficulty == DEFAULT_DIFFICULTY[task] for i in first)
    assert all(i == generate(task, i.seed, i.difficulty) for i in first)  # rebuildable from its seed
    assert sample_instances(task, 50, seed=0) == first[:50]               # a stable prefix
    other = sample_instances(task, 200, seed=1)
    assert len({i.seed for i in first} & {i.seed for i in other}) < 5


def test_sample_instances_difficulty_and_edge_sizes():
    assert {i.difficulty for i in sample_instances("reverse", 20, seed=3, difficulty=4)} == {4}
    assert sample_instances("reverse", 0, seed=3) == []
    # the same seeds for every task and difficulty: a per-seed comparison across tasks lines up
    assert ([i.seed for i in sample_instances("reverse", 10, seed=3)]
            == [i.seed for i in sample_instances("arithmetic", 10, seed=3, difficulty=1)])
    for n in (-1, EVAL_SEED_LIMIT + 1, 2.5):
        with pytest.raises(QwenlabError, match="number of instances"):
            sample_instances("reverse", n, seed=0)


def _marker_rule_by_definition(pattern, text):
    """The marker rule as answers.py states it, searched marker by marker from the last (quadratic)."""
    from qwenlab.tasks.answers import _MARKER

    for marker in reversed(list(_MARKER.finditer(text))):
        match = pattern.search(text, marker.end())
        if match:
            return match
    matches = list(pattern.finditer(text))
    return matches[-1] if matches else None


def test_answer_extraction_agrees_with_the_marker_rule_on_random_text():
    import random

    from qwenlab.tasks.answers import _NUMBER, _WORD, _find

    pieces = ["answer", "Answer", " is", "is", ":", " ", "-", "\u2212", "1", "23", ",", ",234", ".", "5", "abc",
              "isn't", "'", "\n", "answer is", "answer:", "42", "Qwen2.5", "\u00e9"]
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        for pattern in (_NUMBER, _WORD):
            ours, reference = _find(pattern, text), _marker_rule_by_definition(pattern, text)
            assert (ours and (ours.span(), ours.group())) == (reference and (reference.span(), reference.group())), \
                (text, pattern.pattern)


@pytest.mark.parametrize("text", ["answer is " * 6553, "The answer is:" + " " * 65_000, "answer is x " * 5461,
                                  "9" * 65_536, "1,234," * 10_922])
def test_answer_extraction_of_64_kib_is_bounded(text):
    """Linear time: a 64 KiB completion built to be slow scores within a generous regression bound
    (marker by marker it took about 1.8 s of CPU)."""
    import time

    started = time.process_time()
    score("arithmetic", text, "12")
    score("reverse", text, "olleh")
    assert time.process_time() - started < 0.2
