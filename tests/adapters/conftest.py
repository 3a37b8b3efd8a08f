"""Fixtures: PEFT adapters trained nowhere - random LoRA weights on tiny transformers Qwen2 models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import build_hf_model

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(base_dir: Path, out: Path, *, r=4, alpha=8, targets=ALL_LINEAR, rslora=False, seed=0,
                      alpha_pattern=None, rank_pattern=None):
    """A PEFT LoRA on the HF model in base_dir with non-zero random lora_B; saved to `out`. Returns the PeftModel."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, use_rslora=rslora,
                        alpha_pattern=alpha_pattern or {}, rank_pattern=rank_pattern or {}, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # PEFT starts B at zero; make the adapter do something
    model.eval()
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapters") / "base"
    build_hf_model(folder, seed=3)
    return folder


@pytest.fixture(scope="session")
def other_base_dir(tmp_path_factory) -> Path:
    """A base of another shape (wider MLP): adapters of base_dir do not fit it."""
    folder = tmp_path_factory.mktemp("adapters") / "other"
    build_hf_model(folder, intermediate=96, seed=4, with_tokenizer=False)
    return folder
