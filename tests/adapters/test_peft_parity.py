"""PEFT parity: adapters load both ways, same logits, merge equals merge_and_unload, extract/combine."""

from __future__ import annotations

import copy

import pytest
import torch

from qwenlab.adapters import (
    AdaptedCheckpoint,
    active_adapters,
    attach_adapter,
    merge_adapter,
    merge_adapter_into_folder,
    read_adapter,
    unmerge_adapter,
    write_adapter,
)
from qwenlab.adapters import without_adapter_wrappers
from qwenlab.adapters.apply import lora_modules
from qwenlab.adapters.combine import combine_adapters
from qwenlab.errors import QwenlabError
from qwenlab.adapters.extract import extract_adapter
from qwenlab.checkpoint import open_checkpoint
from qwenlab.model import load_model
from tests.adapters.conftest import make_peft_adapter

TOKENS = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(7))

VARIANTS = {
    "all-linear": dict(r=4, alpha=8),
    "rslora-qv": dict(r=8, alpha=16, targets=["q_proj", "v_proj"], rslora=True),
    "patterns": dict(r=4, alpha=8, alpha_pattern={"down_proj": 3}, rank_pattern={r"layers\.1\.self_attn\.q_proj": 2}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def peft_pair(request, base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "adapter"
    peft_model = make_peft_adapter(base_dir, out, **VARIANTS[request.param])
    return peft_model, out


def peft_logits(peft_model) -> torch.Tensor:
    with torch.no_grad():
        return peft_model(TOKENS).logits


def test_peft_adapter_gives_peft_logits(peft_pair, base_dir):
    peft_model, adapter_dir = peft_pair
    model = load_model(base_dir, "fp32")
    attach_adapter(model, adapter_dir, "a")
    with torch.no_grad(), active_adapters(model, "a"):
        ours = model(TOKENS)
    expected = peft_logits(peft_model)
    assert (ours - expected).abs().max().item() <= 1e-4
    with torch.no_grad():  # with no adapter chosen, the base alone
        assert (model(TOKENS) - expected).abs().max().item() > 1e-3


def test_merge_equals_merge_and_unload(peft_pair, base_dir, tmp_path):
    peft_model, adapter_dir = peft_pair
    merged = copy.deepcopy(peft_model).merge_and_unload()
    expected = merged.state_dict()
    adapted = AdaptedCheckpoint(open_checkpoint(base_dir), adapter_dir)
    for name in adapted.tensor_names():
        assert (adapted.get(name) - expected[name]).abs().max().item() <= 1e-6, name
    out = merge_adapter_into_folder(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    with torch.no_grad():
        reference = merged(TOKENS).logits
    assert (load_model(out, "fp32")(TOKENS) - reference).abs().max().item() <= 1e-4


def test_merge_and_unmerge_in_the_model(peft_pair, base_dir):
    peft_model, adapter_dir = peft_pair
    model = load_model(base_dir, "fp32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attach_adapter(model, adapter_dir, "a")
    merge_adapter(model, "a")
    with torch.no_grad():
        assert (model(TOKENS) - peft_logits(peft_model)).abs().max().item() <= 1e-4
        with active_adapters(model, "a"):  # a merged adapter is not applied twice
            assert (model(TOKENS) - peft_logits(peft_model)).abs().max().item() <= 1e-4
    with without_adapter_wrappers(model):  # a plain model on the merged weights: still PEFT's logits
        assert not lora_modules(model)
        with torch.no_grad():
            assert (model(TOKENS) - peft_logits(peft_model)).abs().max().item() <= 1e-4
    assert lora_modules(model)  # the wrappers are back
    unmerge_adapter(model, "a")
    with pytest.raises(QwenlabError, match="adapter 'a' is not merged"):
        with without_adapter_wrappers(model):
            pass
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert max((after[k] - before[k]).abs().max().item() for k in before) <= 1e-6


def test_qwenlab_written_adapter_loads_in_peft(peft_pair, base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model, adapter_dir = peft_pair
    rewritten = write_adapter(read_adapter(adapter_dir), tmp_path / "rewritten")
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(hf, rewritten).eval()
    assert (peft_logits(loaded) - peft_logits(peft_model)).abs().max().item() <= 1e-5


def test_extract_at_rank_r_reproduces_a_rank_r_delta(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    make_peft_adapter(base_dir, tmp_path / "lora", r=3, alpha=5, seed=1)
    finetuned = merge_adapter_into_folder(base_dir, tmp_path / "lora", tmp_path / "finetuned", progress=False)
    source = read_adapter(tmp_path / "lora")
    extracted, report = extract_adapter(base_dir, finetuned, rank=3, progress=False)
    assert set(extracted.modules) == set(source.modules)
    for module in source.modules:
        assert (extracted.delta(module) - source.delta(module)).abs().max().item() <= 1e-5, module
    assert report.total_energy > 1 - 1e-6 and not report.not_captured
    # written by qwenlab, read by PEFT: the same model as the fine-tune
    write_adapter(extracted, tmp_path / "extracted")
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "extracted").eval()
    with torch.no_grad():
        assert (peft_model(TOKENS).logits - load_model(finetuned, "fp32")(TOKENS)).abs().max().item() <= 1e-4


def test_extract_at_lower_rank_reports_energy(base_dir, tmp_path):
    make_peft_adapter(base_dir, tmp_path / "lora", r=6, alpha=6, seed=2)
    finetuned = merge_adapter_into_folder(base_dir, tmp_path / "lora", tmp_path / "finetuned", progress=False)
    _, report = extract_adapter(base_dir, finetuned, rank=2, progress=False)
    assert 0.2 < report.total_energy < 0.999
    assert all(0 < e < 1 for e in report.energy.values())


@pytest.fixture(scope="module")
def two_adapters(base_dir, tmp_path_factory):
    """A PeftModel holding adapters 'a' (r 4) and 'b' (r 6), and their folders."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("two")
    make_peft_adapter(base_dir, root / "a", r=4, alpha=8, seed=5)
    make_peft_adapter(base_dir, root / "b", r=6, alpha=6, seed=6, targets=["q_proj", "v_proj", "down_proj"])
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, root / "a", adapter_name="a")
    peft_model.load_adapter(root / "b", adapter_name="b")
    return peft_model, root / "a", root / "b"


def test_mixed_per_row_batch_equals_one_at_a_time(two_adapters, base_dir, tmp_path):
    from qwenlab.model import GenerationConfig, generate, load_tokenizer

    _, a_dir, b_dir = two_adapters
    model = load_model(base_dir, "fp32")
    attach_adapter(model, a_dir, "a")
    attach_adapter(model, b_dir, "b")
    choice = ["a", None, "b", "a"]
    tokens = torch.randint(0, 300, (4, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with active_adapters(model, choice):
            mixed = model(tokens)
        for row, name in enumerate(choice):
            with active_adapters(model, name):
                single = model(tokens[row:row + 1])
            assert (mixed[row] - single[0]).abs().max().item() <= 1e-5
    tokenizer = load_tokenizer(base_dir)
    prompts = ["What is 12 + 7?", "hello", "Reverse the word: apple", "hello world"]
    config = GenerationConfig(max_new_tokens=6)
    with active_adapters(model, choice):
        batch = [c.text for c in generate(model, tokenizer, prompts, config, chat=True)]
    for prompt, name, text in zip(prompts, choice, batch):
        with active_adapters(model, name):
            assert generate(model, tokenizer, [prompt], config, chat=True)[0].text == text


@pytest.mark.parametrize("method,peft_method", [("cat", "cat"), ("svd", "svd"), ("ties", "ties_svd")])
def test_combine_matches_peft_add_weighted_adapter(two_adapters, method, peft_method):
    peft_model, a_dir, b_dir = two_adapters
    weights = [0.7, -0.4]
    name = f"combined-{method}"
    # PEFT's svd methods default to the largest input rank; ours too.
    peft_model.add_weighted_adapter(["a", "b"], weights, name, combination_type=peft_method, density=0.5,
                                    svd_rank=10)
    ours, _ = combine_adapters([read_adapter(a_dir), read_adapter(b_dir)], weights, method, rank=10, density=0.5)
    checked = 0
    for module_name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            expected = module.get_delta_weight(name)
            assert (ours.delta(module_name) - expected).abs().max().item() <= 1e-5, module_name
            checked += 1
    assert checked == len(ours.modules) > 0


def test_combine_linear_matches_peft_and_needs_equal_ranks(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwenlab.errors import QwenlabError

    make_peft_adapter(base_dir, tmp_path / "a", r=4, alpha=8, seed=8)
    make_peft_adapter(base_dir, tmp_path / "b", r=4, alpha=4, seed=9)
    make_peft_adapter(base_dir, tmp_path / "c", r=2, alpha=4, seed=10)
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "a", adapter_name="a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], [0.5, -1.5], "lin", combination_type="linear")
    ours, _ = combine_adapters([read_adapter(tmp_path / "a"), read_adapter(tmp_path / "b")], [0.5, -1.5], "linear")
    module = peft_model.base_model.model.model.layers[0].mlp.up_proj
    expected = module.get_delta_weight("lin")
    assert (ours.delta("model.layers.0.mlp.up_proj") - expected).abs().max().item() <= 1e-5
    with pytest.raises(QwenlabError, match="equal rank"):
        combine_adapters([read_adapter(tmp_path / "a"), read_adapter(tmp_path / "c")], None, "linear")


def test_cat_is_exact_and_loads_in_peft(two_adapters, base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, a_dir, b_dir = two_adapters
    a, b = read_adapter(a_dir), read_adapter(b_dir)
    combined, report = combine_adapters([a, b], [1.0, 1.0], "cat")
    assert report.rank == 10
    model = load_model(base_dir, "fp32")
    attach_adapter(model, combined, "ab")
    merge_adapter(model, "ab")  # merged (a + b) vs both applied at run time, one after the other
    reference = load_model(base_dir, "fp32")
    attach_adapter(reference, a, "a")
    attach_adapter(reference, b, "b")
    merge_adapter(reference, "a")
    merge_adapter(reference, "b")
    with torch.no_grad():
        assert (model(TOKENS) - reference(TOKENS)).abs().max().item() <= 1e-4
    write_adapter(combined, tmp_path / "cat")
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(hf, tmp_path / "cat").eval()
    with torch.no_grad():
        assert (loaded(TOKENS).logits - reference(TOKENS)).abs().max().item() <= 1e-4
