"""Generation behaviour: batching with left padding, sampling, stop strings, context limits, streaming."""

import sys

import pytest
import torch

from qwenlab.errors import QwenlabError
from qwenlab.model import GenerationConfig, generate, load_model, load_tokenizer, stream_generate
from qwenlab.model.generate import generate_token_ids
from qwenlab.model.sampling import apply_repetition_penalty, apply_top_k, apply_top_p


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def run_ids(model, prompts, **kw):
    rows = [[] for _ in prompts]
    for step in generate_token_ids(model, prompts, GenerationConfig(**kw), stop_ids=set()):
        for row, token in enumerate(step):
            if token is not None:
                rows[row].append(token)
    return rows


def test_batched_left_padding_equals_one_by_one(model):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20]]
    batched = run_ids(model, prompts, max_new_tokens=12)
    single = [run_ids(model, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == single


def test_chunked_prefill_equals_one_pass(model, monkeypatch):
    """A prompt longer than PREFILL_CHUNK goes through in chunks (each attending to the cache the
    earlier ones filled): the same greedy tokens as one pass, with left padding."""
    generate_module = sys.modules["qwenlab.model.generate"]
    prompts = [[(7 * i) % 250 + 3 for i in range(23)], [5, 6, 7, 8, 9]]
    one_pass = run_ids(model, prompts, max_new_tokens=10)
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda tokens, **kw: seen.append(tokens.shape[1]) or forward(tokens, **kw))
    monkeypatch.setattr(generate_module, "PREFILL_CHUNK", 4)
    assert run_ids(model, prompts, max_new_tokens=10) == one_pass
    assert seen[:6] == [4, 4, 4, 4, 4, 3]  # 23 tokens in chunks of 4, then one token per decode step
    assert all(t == 1 for t in seen[6:])


def test_batched_sampling_with_padding_has_no_nan(model):
    rows = run_ids(model, [[1, 2], [3, 4, 5, 6, 7, 8]], max_new_tokens=8, temperature=1.0, seed=0)
    assert all(len(r) == 8 for r in rows)


def test_seed_makes_sampling_deterministic(model):
    a = run_ids(model, [[5, 6, 7]], max_new_tokens=15, temperature=1.5, seed=123)
    b = run_ids(model, [[5, 6, 7]], max_new_tokens=15, temperature=1.5, seed=123)
    c = run_ids(model, [[5, 6, 7]], max_new_tokens=15, temperature=1.5, seed=124)
    assert a == b and a != c


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = run_ids(model, [[5, 6, 7]], max_new_tokens=10)
    assert run_ids(model, [[5, 6, 7]], max_new_tokens=10, temperature=1.0, top_k=1, seed=3) == greedy
    assert run_ids(model, [[5, 6, 7]], max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_sampling_filters_match_transformers_processors():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 2, 3], [4, 4, 5], [0, 49, 7]])
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), expected)
    assert torch.equal(apply_top_k(logits, 7), TopKLogitsWarper(7)(ids, logits.clone()))
    assert torch.equal(apply_top_p(logits, 0.8), TopPLogitsWarper(0.8)(ids, logits.clone()))


def test_repetition_penalty_changes_greedy_output(model):
    plain = run_ids(model, [[5, 6, 7]], max_new_tokens=20)
    penalised = run_ids(model, [[5, 6, 7]], max_new_tokens=20, repetition_penalty=5.0)
    assert plain != penalised


def test_stop_string_truncates_text_and_sets_finish_reason(model, tokenizer):
    full = generate(model, tokenizer, ["hello"], GenerationConfig(max_new_tokens=20), stop_ids=set())[0]
    assert full.finish_reason == "length" and len(full.text) > 4
    stop = full.text[2:4]
    cut = generate(model, tokenizer, ["hello"], GenerationConfig(max_new_tokens=20, stop=(stop,)), stop_ids=set())[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_stop_token_ends_generation(model, tokenizer):
    ids = run_ids(model, [[5, 6, 7]], max_new_tokens=10)[0]
    stop_token = ids[3]
    first = ids.index(stop_token)
    out = generate(model, tokenizer, [tokenizer.decode([5, 6, 7])], GenerationConfig(max_new_tokens=10),
                   stop_ids={stop_token})[0]
    assert out.finish_reason == "stop" and len(out.token_ids) <= first


def test_streaming_concatenates_to_the_full_text(model, tokenizer):
    ids = [tokenizer.encode("What is 12 + 7?")]
    results = []
    events = list(stream_generate(model, tokenizer, ids, GenerationConfig(max_new_tokens=16), set(), results))
    assert "".join(e.text for e in events) == results[0].text
    assert events[-1].finish_reason == "length" and sum(e.finish_reason is not None for e in events) == 1


def test_context_limit_errors_or_truncates(model):
    long_prompt = list(range(1, 40))
    with pytest.raises(QwenlabError, match="context window is 32"):
        run_ids(model, [long_prompt], max_new_tokens=4, max_context=32)
    out = run_ids(model, [long_prompt], max_new_tokens=4, max_context=32, truncate_prompt=True)[0]
    assert out == run_ids(model, [long_prompt[-28:]], max_new_tokens=4)[0]


def test_generation_stops_at_the_context_window(model):
    out = run_ids(model, [[1, 2, 3, 4]], max_new_tokens=100, max_context=10)[0]
    assert len(out) == 6


def test_bad_generation_settings_are_rejected(model):
    for kw in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=-2)):
        with pytest.raises(QwenlabError):
            run_ids(model, [[1]], **kw)


def test_sampling_settings_that_would_poison_the_arithmetic_are_rejected(model):
    for kw in (dict(temperature=1e-300), dict(temperature=float("nan")), dict(repetition_penalty=float("inf")),
               dict(repetition_penalty=1e-300), dict(top_k=-1), dict(seed=-1), dict(seed=2**63),
               dict(max_context=0), dict(stop=("",))):
        with pytest.raises(QwenlabError, match=next(iter(kw))):
            run_ids(model, [[1]], **kw)
    with pytest.raises(QwenlabError, match="exceeds the model's context window"):
        run_ids(model, [[1]], max_context=model.config.max_position_embeddings + 1)


# ---- streamed text equals the tokenizer's own decode ------------------------------------------------


def _byte_token_ids(tokenizer) -> dict[int, int]:
    """byte -> id of the token that is exactly that byte (every byte-level BPE has all 256)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {b: tokenizer.token_id(char) for b, char in bytes_to_unicode().items()}


@pytest.fixture(scope="module")
def tokenizer_with_added_token(tmp_path_factory):
    """The fixture tokenizer plus a non-special added token, which decode writes as its text."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    from tests.conftest import build_tokenizer

    folder = tmp_path_factory.mktemp("tok-added")
    build_tokenizer(folder)
    rust = RustTokenizer.from_file(str(folder / "tokenizer.json"))
    rust.add_tokens([AddedToken("<tool_call>", special=False)])
    rust.save(str(folder / "tokenizer.json"))
    return load_tokenizer(folder)


def _random_ids(tokenizer, rng) -> list[int]:
    """Token ids that split characters across tokens, and bytes that can never be valid UTF-8."""
    bytes_ = _byte_token_ids(tokenizer)
    high = [bytes_[b] for b in range(0x80, 0x100)]  # continuation bytes, lead bytes, 0xC0/0xF5-0xFF
    pieces = [bytes_[b] for b in "é€😀中".encode("utf-8")]
    special = [tokenizer.token_id(t) for t in ("<|im_end|>", "<|im_start|>", "<|endoftext|>")]
    added = [i for i in [tokenizer.token_id("<tool_call>")] if i is not None]
    pools = [high, pieces, list(range(tokenizer.vocab_size)), special + added,
             [tokenizer.vocab_size + 5]]  # an id past the vocabulary (a model's vocab may be larger)
    ids = []
    for _ in range(rng.randint(1, 24)):
        pool = rng.choices(pools, weights=[5, 4, 4, 1, 0.2])[0]
        ids.append(rng.choice(pool))
    return ids


def _stream(tokenizer, ids, stop=()) -> tuple[list[str], bool]:
    from qwenlab.model.generate import _RowText

    row, pieces = _RowText(tokenizer, tuple(stop)), []
    for token in ids:
        delta, hit = row.add(token)
        pieces.append(delta)
        if hit:
            break
    pieces.append(row.flush())
    return pieces, row.stopped


@pytest.mark.parametrize("which", ["nano", "fixture"])
def test_streamed_pieces_join_to_the_tokenizers_decode(which, tokenizer_with_added_token):
    import random

    from qwenlab.nano import nano_path

    tok = load_tokenizer(nano_path()) if which == "nano" else tokenizer_with_added_token
    rng = random.Random(which)
    replaced = 0
    for _ in range(1500):
        ids = _random_ids(tok, rng)
        pieces, _ = _stream(tok, ids)
        expected = tok.decode(ids)
        assert "".join(pieces) == expected, ids
        replaced += "\ufffd" in expected
    assert replaced > 300  # the sequences did exercise invalid and split UTF-8


def test_invalid_bytes_are_emitted_at_once_and_split_characters_are_held(tokenizer):
    b = _byte_token_ids(tokenizer)
    pieces, _ = _stream(tokenizer, [b[ord("a")], b[0x80]])  # a lone continuation byte: never valid
    assert pieces == ["a", "\ufffd", ""]
    euro = "€".encode("utf-8")
    pieces, _ = _stream(tokenizer, [b[euro[0]], b[euro[1]], b[euro[2]]])
    assert pieces == ["", "", "€", ""]
    pieces, _ = _stream(tokenizer, [b[euro[0]], b[euro[1]]])  # cut short: flushed as decode shows it
    assert pieces == ["", "", "\ufffd"] and tokenizer.decode([b[euro[0]], b[euro[1]]]) == "\ufffd"
    pieces, _ = _stream(tokenizer, [b[0xE0], b[0x80]])  # E0 80 can never start a character
    assert "".join(pieces[:2]) == "\ufffd\ufffd"


def test_stop_strings_still_cut_the_stream(tokenizer):
    import random

    rng = random.Random(1)
    cut = 0
    for _ in range(400):
        ids = _random_ids(tokenizer, rng)
        full = tokenizer.decode(ids)
        if len(full) < 3:
            continue
        start = rng.randrange(len(full) - 1)
        stop = full[start:start + rng.randint(1, 3)]
        pieces, hit = _stream(tokenizer, ids, (stop,))
        assert hit and "".join(pieces) == full[:full.find(stop)], (ids, stop)
        cut += 1
    assert cut > 100


def test_generated_stream_equals_decode_of_its_tokens(model, tokenizer):
    """Sampled at a high temperature, the tiny model emits byte tokens that split or break UTF-8."""
    prompts = [tokenizer.encode(p) for p in ("hello", "What is 12 + 7?", "apple")]
    replaced = 0
    for seed in range(6):
        results = []
        config = GenerationConfig(max_new_tokens=24, temperature=2.0, seed=seed)
        events = list(stream_generate(model, tokenizer, prompts, config, set(), results))
        for row, completion in enumerate(results):
            streamed = "".join(e.text for e in events if e.row == row)
            assert streamed == completion.text == tokenizer.decode(completion.token_ids)
            replaced += "\ufffd" in completion.text
    assert replaced > 0


def test_repeated_prompts_are_prefilled_once_and_match_their_runs_alone(model, monkeypatch):
    """Rows with the same prompt (n samples of one prompt, a GRPO group) share one prefill: the prefill pass has
    one row per distinct prompt, greedy rows equal their runs alone, and sampled copies still differ."""
    prompts = [[5, 6, 7], [8, 9, 10, 11], [5, 6, 7], [8, 9, 10, 11], [5, 6, 7]]
    prefill_rows = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda tokens, **kw: (tokens.shape[1] > 1 and prefill_rows.append(
        tokens.shape[0])) or forward(tokens, **kw))
    greedy = run_ids(model, prompts, max_new_tokens=8)
    assert prefill_rows == [2]
    assert greedy == [run_ids(model, [p], max_new_tokens=8)[0] for p in prompts]
    sampled = run_ids(model, prompts, max_new_tokens=12, temperature=1.5, seed=3)
    assert len({tuple(sampled[i]) for i in (0, 2, 4)}) > 1  # each copy draws its own tokens


def test_sampling_draws_tokens_in_proportion_to_their_probabilities():
    from qwenlab.model.sampling import choose_next_tokens

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = torch.log(probs).expand(40000, 5)
    drawn = choose_next_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    share = torch.bincount(drawn, minlength=5).float() / len(drawn)
    # 4 standard errors of a binomial share at n = 40,000 is at most 0.01; a zero-probability token never comes
    assert (share - probs).abs().max().item() < 0.01 and share[4] == 0


def test_sampling_refuses_a_row_without_a_distribution():
    """NaN logits (or a temperature so small that they overflow) are refused as multinomial refused them, so the
    caller can fail that row alone instead of emitting an arbitrary token."""
    from qwenlab.model.sampling import choose_next_tokens

    logits = torch.zeros(2, 5)
    logits[1, 2] = float("nan")
    with pytest.raises(ValueError, match="inf, nan"):
        choose_next_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
