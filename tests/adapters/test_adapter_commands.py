"""`qwenlab adapter merge|extract|combine`, AdaptedCheckpoint, and every bad input: one line, no output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenlab.adapters import AdaptedCheckpoint, attach_adapter, read_adapter
from qwenlab.adapters.lora_linear import LoRALinear
from qwenlab.checkpoint import open_checkpoint
from qwenlab.cli import main
from qwenlab.errors import QwenlabError
from qwenlab.model import load_model
from tests.adapters.conftest import make_peft_adapter


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-adapters")
    make_peft_adapter(base_dir, root / "a", r=4, alpha=8, seed=11)
    make_peft_adapter(base_dir, root / "b", r=2, alpha=4, seed=12, targets=["q_proj", "v_proj"])
    return root / "a", root / "b"


def test_merge_extract_combine_commands(base_dir, adapters, tmp_path, capsys):
    a, b = adapters
    assert main(["adapter", "merge", str(base_dir), str(a), str(tmp_path / "merged")]) == 0
    merged = open_checkpoint(tmp_path / "merged")
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "merged" / "lineage.json").read_text())["method"] == "lora-merge"
    assert main(["adapter", "extract", str(base_dir), str(merged.path), str(tmp_path / "x"), "--rank", "4"]) == 0
    assert "energy captured 1.0000" in capsys.readouterr().out
    assert read_adapter(tmp_path / "x").ranks() == {4}
    assert main(["adapter", "combine", str(tmp_path / "c"), str(a), str(b), "--method", "cat",
                 "--weights", "1,0.5"]) == 0
    assert read_adapter(tmp_path / "c").ranks() == {6}
    capsys.readouterr()
    assert main(["adapter", "combine", str(tmp_path / "t"), str(a), str(b), "--method", "dare_ties",
                 "--density", "0.5", "--rank", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rank"] == 3 and 0 < report["total_energy_min"] <= 1


def test_adapted_checkpoint_is_a_lazy_checkpoint(base_dir, adapters):
    a, _ = adapters
    adapted = AdaptedCheckpoint(open_checkpoint(base_dir), a)
    base = open_checkpoint(base_dir)
    assert adapted.tensor_names() == base.tensor_names() and adapted.config == base.config
    name = "model.layers.1.mlp.down_proj.weight"
    assert adapted.shape(name) == base.shape(name)
    adapter = read_adapter(a)
    expected = base.get(name) + adapter.delta("model.layers.1.mlp.down_proj")
    assert torch.allclose(adapted.get(name), expected, atol=1e-6)
    assert torch.equal(adapted.get("model.norm.weight"), base.get("model.norm.weight"))
    # load_model reads it like any checkpoint
    model = load_model(adapted, "fp32")
    assert torch.allclose(model.model.layers[1].mlp.down_proj.weight, expected, atol=1e-6)


def test_adapter_for_another_base_names_module_and_shapes(other_base_dir, adapters, tmp_path, capsys):
    a, _ = adapters
    shapes = r"module 'model\.layers\.0\.mlp\.down_proj' is \[48, 96\] .* expects \[48, 80\]"
    with pytest.raises(QwenlabError, match=shapes):
        AdaptedCheckpoint(open_checkpoint(other_base_dir), a)
    with pytest.raises(QwenlabError, match=r"expects \[48, 80\]"):
        attach_adapter(load_model(other_base_dir, "fp32"), a, "a")
    assert main(["adapter", "merge", str(other_base_dir), str(a), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "made for another base" in err
    assert not any(tmp_path.iterdir())  # nothing written, not even a temporary folder


def test_rank_mismatch_for_linear_combine(adapters, tmp_path, capsys):
    a, b = adapters
    assert main(["adapter", "combine", str(tmp_path / "out"), str(a), str(b), "--method", "linear"]) == 2
    assert "needs adapters of equal rank" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_unreadable_adapters_fail_with_one_line(adapters, tmp_path):
    a, _ = adapters
    with pytest.raises(QwenlabError, match="missing adapter_config.json"):
        read_adapter(tmp_path)
    bad = tmp_path / "dora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({**json.loads((a / "adapter_config.json").read_text()),
                                                          "use_dora": True}))
    with pytest.raises(QwenlabError, match="'use_dora'"):
        read_adapter(bad)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    tensors = load_file(a / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.modules_to_save.weight"] = torch.zeros(2, 2)
    save_file(tensors, odd / "adapter_model.safetensors")
    with pytest.raises(QwenlabError, match="unexpected tensor 'base_model.model.lm_head"):
        read_adapter(odd)
    del tensors["base_model.model.lm_head.modules_to_save.weight"]
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, odd / "adapter_model.safetensors")
    with pytest.raises(QwenlabError, match="q_proj' has no lora_B"):
        read_adapter(odd)


def test_unknown_adapter_name_and_detach(base_dir, adapters):
    from qwenlab.adapters import active_adapters, adapter_names, detach_adapter

    a, b = adapters
    model = load_model(base_dir, "fp32")
    attach_adapter(model, a, "a")
    attach_adapter(model, b, "b")
    assert adapter_names(model) == ["a", "b"]
    with pytest.raises(QwenlabError, match="unknown adapter 'c'; attached: a, b"):
        with active_adapters(model, ["a", "c"]):
            pass
    with pytest.raises(QwenlabError, match="already attached"):
        attach_adapter(model, a, "a")
    detach_adapter(model, "a")
    detach_adapter(model, "b")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_generate_with_adapter_equals_peft_greedy(base_dir, adapters, capsys):
    """`qwenlab generate --adapter` (adapter folded in) continues a prompt as PEFT's model does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwenlab.model import load_tokenizer

    a, _ = adapters
    ids = load_tokenizer(base_dir).encode("hello world")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), a)
    with torch.no_grad():
        out = peft_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
    expected = load_tokenizer(base_dir).decode(out[0, len(ids):].tolist())
    assert main(["generate", str(base_dir), "--prompt", "hello world", "--max-new-tokens", "6",
                 "--adapter", str(a)]) == 0
    with_adapter = capsys.readouterr().out
    assert with_adapter == expected + "\n"
    assert main(["generate", str(base_dir), "--prompt", "hello world", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out != with_adapter  # the adapter changes the continuation


def test_generate_with_an_adapter_for_another_base_fails_in_one_line(other_base_dir, adapters, capsys):
    a, _ = adapters
    from tests.conftest import build_tokenizer

    build_tokenizer(other_base_dir)
    assert main(["generate", str(other_base_dir), "--prompt", "hi", "--adapter", str(a)]) == 2
    assert "error:" in capsys.readouterr().err


def test_merge_takes_base_plus_adapter_inputs(base_dir, adapters, tmp_path, capsys):
    """mergekit's "model+lora" syntax: the adapter is applied per tensor, no full model is written."""
    from qwenlab.merge import merge

    a, b = adapters
    for name, adapter in (("full-a", a), ("full-b", b)):
        assert main(["adapter", "merge", str(base_dir), str(adapter), str(tmp_path / name), "--dtype", "fp32"]) == 0
    linear = lambda x, y: {"merge_method": "linear", "dtype": "float32",
                           "models": [{"model": x, "parameters": {"weight": 0.7}},
                                      {"model": y, "parameters": {"weight": 0.3}}]}
    merge(linear(f"{base_dir}+{a}", f"{base_dir}+{b}"), tmp_path / "on-the-fly", progress=False)
    merge(linear(str(tmp_path / "full-a"), str(tmp_path / "full-b")), tmp_path / "from-full", progress=False)
    fly, full = open_checkpoint(tmp_path / "on-the-fly"), open_checkpoint(tmp_path / "from-full")
    assert sorted(fly.tensor_names()) == sorted(full.tensor_names())
    for name in full.tensor_names():
        torch.testing.assert_close(fly.get(name), full.get(name), rtol=0, atol=1e-6)
    roles = {i["role"] for i in json.loads((tmp_path / "on-the-fly" / "lineage.json").read_text())["inputs"]}
    assert {"model0", "model0-adapter", "model1-adapter"} <= roles
    with pytest.raises(QwenlabError, match="not a LoRA adapter folder"):
        merge(linear(f"{base_dir}+{tmp_path}", str(tmp_path / "full-b")), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
