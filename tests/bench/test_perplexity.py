"""Sliding-window perplexity: every token scored once, and equal to transformers' own loss."""

import math

import pytest
import torch

from qwenlab.eval.perplexity import evaluate_perplexity, read_documents, sequence_nll, windows
from qwenlab.errors import QwenlabError

TEXT = "What is 12 + 7? The answer is 19. Reverse the word: apple. hello world " * 3


@pytest.mark.parametrize("length,max_length,stride", [(2, 4, 4), (10, 4, 1), (10, 4, 3), (10, 4, 4), (33, 8, 5),
                                                      (8, 16, 8), (9, 8, 8)])
def test_windows_score_each_target_once_with_enough_context(length, max_length, stride):
    seen = []
    for start, end, first in windows(length, max_length, stride):
        assert end - start <= max_length and start <= first - 1
        seen += list(range(first, end + 1))
        if first > 1 and stride < max_length:  # after the first window: at least max_length - stride context
            assert first - start >= max_length - stride
    assert seen == list(range(1, length))


def test_window_arguments_are_checked():
    with pytest.raises(QwenlabError, match="stride"):
        windows(10, 4, 5)


@pytest.fixture(scope="module")
def hf_and_ours(family):
    from transformers import AutoModelForCausalLM

    from qwenlab.model import load_model, load_tokenizer

    hf = AutoModelForCausalLM.from_pretrained(family / "base", dtype=torch.float32).eval()
    return hf, load_model(family / "base"), load_tokenizer(family / "base")


def hf_window_nll(hf, ids, max_length, stride):
    """The reference: transformers' log-probabilities, window by window, over the same targets."""
    total = 0.0
    for start, end, first in windows(len(ids), max_length, stride):
        window = torch.tensor(ids[start:end + 1])  # inputs ids[start:end], targets ids[start + 1:end + 1]
        with torch.no_grad():
            logits = hf(window[None, :-1]).logits[0].float()
        log_probs = torch.log_softmax(logits, -1)[first - 1 - start:]
        total -= float(log_probs.gather(-1, window[first - start:, None]).sum())
    return total


def test_full_context_equals_transformers_loss(hf_and_ours):
    hf, model, tokenizer = hf_and_ours
    ids = [tokenizer.eos_id] + tokenizer.encode(TEXT)
    nll, count = sequence_nll(model, ids, max_length=len(ids), stride=len(ids))
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss  # mean over ids[1:]
    assert count == len(ids) - 1
    assert nll / count == pytest.approx(float(loss), abs=1e-5)


@pytest.mark.parametrize("max_length,stride", [(16, 8), (16, 16), (12, 5)])
def test_strided_windows_equal_transformers(hf_and_ours, max_length, stride):
    hf, model, tokenizer = hf_and_ours
    ids = [tokenizer.eos_id] + tokenizer.encode(TEXT)
    nll, count = sequence_nll(model, ids, max_length, stride, batch_size=3)
    assert count == len(ids) - 1
    assert nll == pytest.approx(hf_window_nll(hf, ids, max_length, stride), rel=1e-5)


def test_evaluate_perplexity_over_jsonl_documents(hf_and_ours, tmp_path):
    _, model, tokenizer = hf_and_ours
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "hello world"}\n\n{"text": "What is 12 + 7?"}\n')
    documents = read_documents(path)
    result = evaluate_perplexity(model, tokenizer, documents, max_length=8, stride=4, progress=False)
    assert result.documents == 2 and result.words == 7 and result.bytes == len("hello worldWhat is 12 + 7?")
    assert result.tokens == sum(len(tokenizer.encode(d)) for d in documents)
    assert result.perplexity == pytest.approx(math.exp(result.nll_sum / result.tokens))
    assert result.as_dict()["bits_per_byte"] > 0


@pytest.mark.parametrize("content,pattern", [("", "empty"), ('{"text": 3}\n', "string field 'text'"),
                                             ("{oops\n", "invalid JSON")])
def test_bad_documents_name_the_problem(tmp_path, content, pattern):
    path = tmp_path / ("doc.txt" if pattern == "empty" else "doc.jsonl")
    path.write_text(content)
    with pytest.raises(QwenlabError, match=pattern):
        read_documents(path)
