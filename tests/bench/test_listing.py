"""`qwenlab ls`: what each variant is, from its files and lineage.json."""

import json

import pytest

from qwenlab.variants.listing import describe_variant, find_variants, lineage_chain, load_variant
from qwenlab.variants.results import record_measurement
from qwenlab.cli import main
from qwenlab.errors import QwenlabError


def test_variants_are_described_from_their_files(family):
    variants = {v.name: v for v in find_variants([family])}
    assert set(variants) == {"base", "other", "slerp-0.3", "slerp-0.7", "lora"}
    assert [variants[n].kind for n in ("base", "other", "slerp-0.3", "lora")] == ["base", "trained", "merge", "adapter"]
    base, lora = variants["base"], variants["lora"]
    assert base.parameters == base.config.parameter_count() and base.dtype == "fp32" and base.method is None
    # 3 layers x (q_proj: A [2, 48] + B [48, 2]; v_proj: A [2, 48] + B [16, 2])
    assert lora.base == family / "base" and lora.parameters == 3 * ((2 * 48 + 48 * 2) + (2 * 48 + 16 * 2))
    assert base.size_bytes == sum(p.stat().st_size for p in (family / "base").iterdir()
                                  if p.name not in ("measurements.jsonl", "README.md"))


def test_lineage_chain_follows_inputs(family):
    chain = lineage_chain(describe_variant(family / "slerp-0.3"))
    assert [(c["name"], c["kind"], c["method"]) for c in chain] == [("slerp-0.3", "merge", "slerp"),
                                                                     ("base", "base", None)]
    assert {i["name"] for i in chain[0]["inputs"]} == {"base", "other"} and all(i["sha256"] for i in chain[0]["inputs"])


def test_load_variant_applies_an_adapter(family):
    import torch

    adapted, tokenizer, variant = load_variant(family / "lora")
    base, _, _ = load_variant(family / "base")
    ids = torch.tensor([tokenizer.encode("hello world")])
    assert variant.kind == "adapter" and not torch.allclose(adapted(ids), base(ids))
    again, _, variant = load_variant(family / "base", adapters=[family / "lora"])
    assert variant.path == family / "lora" and torch.equal(again(ids), adapted(ids))


def test_ls_cli_shows_lineage_size_and_latest_figures(fresh_family, capsys):
    record_measurement(fresh_family / "slerp-0.7", "speed", {"128": {"ttft_s": 0.012, "decode_tokens_per_s": 55.5}})
    record_measurement(fresh_family / "slerp-0.7", "accuracy", {"arithmetic": {"accuracy": 0.25, "n": 8}})
    assert main(["ls", str(fresh_family)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("slerp-0.7"))
    assert "merge" in row and "slerp: base, other" in row and "0.250 (1 task, n=8)" in row and "55.5@128" in row
    assert "12 ms@128" in row
    lora = next(line for line in out.splitlines() if line.startswith("lora"))
    assert "adapter" in lora and "+ base" in lora
    assert main(["ls", str(fresh_family / "base"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["kind"] == "base" and rows[0]["mean_accuracy"] is None and rows[0]["speed"] == {}


def test_ls_errors(tmp_path, capsys):
    assert main(["ls", str(tmp_path)]) == 2
    assert "no model or adapter folders found" in capsys.readouterr().err
    with pytest.raises(QwenlabError, match="not a model or adapter folder"):
        describe_variant(tmp_path)


def test_a_base_plus_adapter_merge_input_is_shown_as_one():
    from qwenlab.variants.listing import _joined_with_adapters

    inputs = [{"role": "base", "path": "/m/nano"}, {"role": "model1", "path": "/m/nano"},
              {"role": "model1-adapter", "path": "/m/sft-a"}, {"role": "model2", "path": "/m/other"}]
    assert _joined_with_adapters(inputs, lambda p: p.rsplit("/", 1)[1]) == ["nano", "nano+sft-a", "other"]


def test_an_adapter_s_size_leaves_out_its_training_checkpoints_which_are_not_variants(tmp_path):
    from qwenlab.variants.listing import describe_variant, find_variants

    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}')
    from safetensors.torch import save_file
    import torch

    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)},
              str(adapter / "adapter_model.safetensors"))
    checkpoint = adapter / "checkpoints" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_config.json").write_text("{}")
    (checkpoint / "optimizer.pt").write_bytes(b"x" * 50_000)
    assert describe_variant(adapter).size_bytes < 2000
    partial = tmp_path / "run" / "other.partial" / "checkpoints" / "checkpoint-3"  # an interrupted run
    partial.mkdir(parents=True)
    (partial / "adapter_config.json").write_text("{}")
    assert [v.path for v in find_variants([tmp_path / "run"])] == [adapter.resolve()]


def test_ls_and_compare_say_when_a_run_did_not_finish(family, tmp_path, capsys):
    import json as json_module
    import shutil

    from qwenlab.cli import main

    run = tmp_path / "run"
    shutil.copytree(family / "base", run / "models" / "base")
    (run / "variants.json").write_text(json_module.dumps({"base": str(run / "models" / "base")}))
    (run / "INCOMPLETE").write_text("Stopped at stage [2/3] train: interrupted\n")
    assert main(["ls", str(run)]) == 0
    assert f"note: {run} is a run that did not finish" in capsys.readouterr().err
    assert main(["compare", str(run), "--out", str(tmp_path / "c")]) == 0
    assert f"note: {run} is a run that did not finish" in capsys.readouterr().err
    (run / "INCOMPLETE").unlink()
    assert main(["ls", str(run)]) == 0 and "did not finish" not in capsys.readouterr().err
