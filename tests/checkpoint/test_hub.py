"""Hub ids offline: a hub cache on disk (real layout), HF_HUB_OFFLINE=1, every command by id."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.adapters.conftest import make_peft_adapter
from tests.checkpoint.hub_cache import add_repo
from tests.conftest import build_hf_model

MAIN, SECOND = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    cache = root / "hf-cache"
    build_hf_model(root / "tiny", seed=1)
    build_hf_model(root / "tiny-v2", seed=2)
    make_peft_adapter(root / "tiny", root / "adapter")
    add_repo(cache, "org/tiny", root / "tiny", MAIN)
    add_repo(cache, "org/tiny", root / "tiny-v2", SECOND, branch="v2")
    add_repo(cache, "org/lora", root / "adapter", MAIN)
    pickled = root / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled / name).write_bytes((root / "tiny" / name).read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    add_repo(cache, "org/pickled", pickled, MAIN)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "QWENLAB_HOME": str(root / "home")}
    return root, env


def qwenlab(env, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenlab", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_info_and_generate_by_id_and_revision(hub):
    root, env = hub
    info = qwenlab(env, "info", "org/tiny")
    assert info.returncode == 0 and "layers" in info.stdout, info.stderr
    outputs = {}
    for ref in ("org/tiny", f"org/tiny@{MAIN}", "org/tiny@v2", f"org/tiny@{SECOND}"):
        done = qwenlab(env, "generate", ref, "--prompt", "hello", "--max-new-tokens", "6")
        assert done.returncode == 0, done.stderr
        outputs[ref] = done.stdout
    local = qwenlab(env, "generate", str(root / "tiny"), "--prompt", "hello", "--max-new-tokens", "6").stdout
    local_v2 = qwenlab(env, "generate", str(root / "tiny-v2"), "--prompt", "hello", "--max-new-tokens", "6").stdout
    assert outputs["org/tiny"] == outputs[f"org/tiny@{MAIN}"] == local
    assert outputs["org/tiny@v2"] == outputs[f"org/tiny@{SECOND}"] == local_v2 != local


def test_an_adapter_by_id_over_a_base_by_id_equals_the_local_one(hub):
    from qwenlab.loading import load

    root, env = hub
    done = qwenlab(env, "generate", "org/tiny", "--adapter", "org/lora", "--prompt", "hello", "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    local = qwenlab(env, "generate", str(root / "tiny"), "--adapter", str(root / "adapter"), "--prompt", "hello",
                    "--max-new-tokens", "6")
    assert done.stdout == local.stdout
    tokens = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        plain = load(root / "tiny").model(tokens)
        adapted = load(root / "tiny", adapters=[root / "adapter"]).model(tokens)
    assert not torch.allclose(plain, adapted)  # the adapter does something, so equal outputs mean it was applied


def test_merge_and_eval_by_id(hub, tmp_path):
    root, env = hub
    (tmp_path / "m.yaml").write_text(f"merge_method: slerp\nbase_model: org/tiny\nmodels:\n  - model: org/tiny\n"
                                     f"  - model: org/tiny@v2\nparameters: {{t: 0.5}}\ndtype: float32\n")
    merged = qwenlab(env, "merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"))
    assert merged.returncode == 0 and (tmp_path / "out" / "config.json").is_file(), merged.stderr
    evaluated = qwenlab(env, "eval", "org/tiny", "--tasks", "reverse", "--n", "2")
    assert evaluated.returncode == 0 and "reverse" in evaluated.stdout, evaluated.stderr


def test_a_missing_id_offline_is_one_line_naming_the_cache_and_the_fix(hub):
    root, env = hub
    done = qwenlab(env, "info", "org/absent")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip()
    assert "\n" not in line and "org/absent" in line and env["HF_HUB_CACHE"] in line
    assert "HF_HUB_OFFLINE=1" in line and "qwenlab pull org/absent" in line


def test_an_unknown_revision_and_pickled_weights_are_refused(hub):
    _, env = hub
    revision = qwenlab(env, "info", "org/tiny@nope")
    assert revision.returncode == 2 and "org/tiny@nope" in revision.stderr and "Traceback" not in revision.stderr
    pickled = qwenlab(env, "generate", "org/pickled", "--prompt", "x")
    assert pickled.returncode == 2 and "pickle" in pickled.stderr.lower() and "Traceback" not in pickled.stderr


def test_pull_ls_cache_and_cache_clear(hub):
    root, env = hub
    pulled = qwenlab(env, "pull", "org/tiny@v2")
    assert pulled.returncode == 0 and SECOND in pulled.stdout, pulled.stderr
    refused = qwenlab(env, "pull", "org/pickled")
    assert refused.returncode == 2 and "no safetensors weights" in refused.stderr
    listed = qwenlab(env, "ls", "--cache")
    assert listed.returncode == 0 and "org/tiny" in listed.stdout and "org/lora" in listed.stdout, listed.stderr
    assert "aaaaaaaaaaaa" in listed.stdout and "bbbbbbbbbbbb" in listed.stdout
    (root / "home" / "kernels").mkdir(parents=True, exist_ok=True)
    (root / "home" / "measurements").mkdir(exist_ok=True)
    dry = qwenlab(env, "cache", "clear")
    assert dry.returncode == 2 and "--yes" in dry.stderr and (root / "home" / "kernels").exists()
    cleared = qwenlab(env, "cache", "clear", "--yes")
    assert cleared.returncode == 0 and not (root / "home" / "kernels").exists()
    assert (root / "home" / "measurements").exists()  # figures are kept without --all


def test_hub_ids_are_recognised_only_in_their_form():
    from qwenlab.checkpoint.hub import parse_hub_id

    assert parse_hub_id("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", None)
    assert parse_hub_id("you/qwen-lora@v1.2") == ("you/qwen-lora", "v1.2")
    for not_an_id in ("nano", "/abs/path", "./rel/x", "a/b/c", "org/", "../x", "org/name@"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_serve_takes_a_base_and_an_adapter_by_id(hub, monkeypatch):
    """The registry `qwenlab serve org/tiny --adapter mine=org/lora` builds, in this process."""
    from huggingface_hub import constants

    from qwenlab.serve.metrics import ServeMetrics
    from qwenlab.serve.server import ServeConfig, build_registry

    _, env = hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    registry = build_registry(ServeConfig(base="org/tiny", adapters={"mine": "org/lora"}), ServeMetrics())
    assert "mine" in registry.base.adapters.names()
