"""qwenlab.load: one loader for every kind of folder, checked against the model core and PEFT."""

import pytest
import torch

from qwenlab.errors import QwenlabError
from qwenlab.loading import load
from qwenlab.model import load_model
from tests.adapters.conftest import make_peft_adapter
from tests.conftest import build_hf_model
from tests.quant.conftest import TINY32

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from qwenlab.quant import quantize_model

    root = tmp_path_factory.mktemp("loading")
    build_hf_model(root / "base", **TINY32)
    peft = make_peft_adapter(root / "base", root / "adapter")
    quantize_model(root / "base", root / "int8", bits=8, group_size=32, progress=False)
    with torch.no_grad():
        expected = peft(TOKENS).logits
    return root, expected


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def test_a_float_folder_loads_as_the_model_core_does(folders):
    root, _ = folders
    loaded = load(root / "base")
    assert not loaded.quantized and loaded.adapters == []
    # fp32 weights on the native decode stack (where it runs): the core's logits up to summation order
    torch.testing.assert_close(logits(loaded.model), logits(load_model(root / "base")), atol=1e-5, rtol=1e-5)
    plain = load(root / "base", float_backend="torch").model  # the plain model core, as before
    assert torch.equal(logits(plain), logits(load_model(root / "base")))
    model, tokenizer, checkpoint = loaded  # unpacks like the loaders it replaced
    assert checkpoint.path == root / "base" and tokenizer.vocab_size > 0


@pytest.mark.parametrize("mode", ["merge", "attach"])
def test_an_adapter_merged_or_attached_gives_peft_s_logits(folders, mode):
    root, expected = folders
    loaded = load(root / "base", adapters=[root / "adapter"], adapter_mode=mode)
    assert (logits(loaded.model) - expected).abs().max() <= 1e-4


def test_an_adapter_folder_loads_over_the_base_it_names(folders):
    root, expected = folders
    loaded = load(root / "adapter")  # adapter_config.json's base_model_name_or_path is root/base
    assert loaded.checkpoint.path.resolve() == (root / "base").resolve() and loaded.adapters == [root / "adapter"]
    assert (logits(loaded.model) - expected).abs().max() <= 1e-4


def test_a_quantized_folder_loads_through_quant_and_takes_one_adapter(folders):
    root, _ = folders
    plain = load(root / "int8")
    assert plain.quantized and type(plain.model).__name__ == "QuantizedQwen2ForCausalLM"
    reference = logits(load_model(root / "base"))
    assert (logits(plain.model) - reference).abs().max() <= 0.05 * reference.abs().max()
    adapted = load(root / "int8", adapters=[root / "adapter"])
    assert not torch.allclose(logits(adapted.model), logits(plain.model))
    with pytest.raises(QwenlabError, match="a quantized base takes one adapter"):
        load(root / "int8", adapters=[root / "adapter", root / "adapter"])


def test_the_model_core_s_loader_points_quantized_folders_to_load(folders):
    root, _ = folders
    with pytest.raises(QwenlabError, match=r"a quantized folder; load it with qwenlab.load\(\)"):
        load_model(root / "int8")


def test_nano_and_missing_references(tmp_path):
    assert load("nano").checkpoint.config.num_hidden_layers == 4
    with pytest.raises(QwenlabError, match="no such model folder"):
        load(tmp_path / "nope")
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "adapter_config.json").write_text('{"base_model_name_or_path": "/no/such/base"}')
    with pytest.raises(QwenlabError, match="cannot find the adapter's base model"):
        load(tmp_path / "orphan")


def test_an_adapter_over_another_base_loads_with_a_warning_naming_both(folders, tmp_path, capsys):
    from tests.conftest import build_hf_model

    root, _ = folders
    build_hf_model(tmp_path / "other", seed=7, **TINY32)
    load(tmp_path / "other", adapters=[root / "adapter"])
    err = capsys.readouterr().err
    assert f"adapter {root / 'adapter'} was trained on {root / 'base'}; applying it over {tmp_path / 'other'}" in err
    load(root / "base", adapters=[root / "adapter"])
    assert "warning" not in capsys.readouterr().err
