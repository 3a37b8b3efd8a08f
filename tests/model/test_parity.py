"""Logits and greedy generation of the model core against transformers' Qwen2ForCausalLM."""

import copy

import pytest
import torch

from qwenlab.model import GenerationConfig, load_model
from qwenlab.model.generate import generate_token_ids
from tests.conftest import build_hf_model

CONFIGS = {
    "gqa3-tied": dict(hidden=48, intermediate=80, layers=3, heads=6, kv_heads=2, tied=True),
    "mha-untied": dict(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=4, tied=False),
    "mqa-odd": dict(hidden=40, intermediate=77, layers=3, heads=5, kv_heads=1, tied=True, vocab_size=131),
    "gqa2-untied-odd": dict(hidden=56, intermediate=99, layers=2, heads=4, kv_heads=2, tied=False, vocab_size=203),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "model"
    hf = build_hf_model(folder, with_tokenizer=False, **CONFIGS[request.param])
    return hf, folder


def test_logits_whole_prompt_fp32(pair):
    hf, folder = pair
    ours = load_model(folder, "fp32")
    tokens = torch.randint(0, hf.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (ours(tokens) - expected).abs().max().item() <= 1e-4


def test_logits_token_by_token_with_cache_fp32(pair):
    hf, folder = pair
    ours = load_model(folder, "fp32")
    tokens = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits
    cache = ours.new_cache(batch=2, capacity=16)
    pieces = [ours(tokens[:, :4], cache=cache)]  # prefill 4, then one token at a time
    pieces += [ours(tokens[:, i:i + 1], cache=cache) for i in range(4, 12)]
    assert (torch.cat(pieces, dim=1) - expected).abs().max().item() <= 1e-4


def test_logits_bf16_close_to_transformers_bf16(pair):
    hf, folder = pair
    ours = load_model(folder, "bf16")
    assert ours.dtype == torch.bfloat16
    tokens = torch.randint(0, hf.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = copy.deepcopy(hf).to(torch.bfloat16)(tokens).logits.float()
        reference = hf(tokens).logits
    got = ours(tokens).float()
    # bf16 has ~3 significant digits: both implementations sit within bf16 rounding of fp32.
    assert (got - expected).abs().max().item() <= 0.05 * expected.abs().max().item()
    assert (got - reference).abs().max().item() <= 0.05 * reference.abs().max().item()


def greedy_ids(model, prompt, n):
    steps = generate_token_ids(model, [prompt], GenerationConfig(max_new_tokens=n), stop_ids=set())
    return [step[0] for step in steps]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_greedy_generation_equals_transformers_generate(pair, dtype):
    hf, folder = pair
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    hf = copy.deepcopy(hf).to(torch_dtype)  # the fixture's fp32 model stays untouched
    ours = load_model(folder, dtype)
    prompt = [5, 17, 3, 9, 11, 4]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert greedy_ids(ours, prompt, 20) == out[0, len(prompt):].tolist()
