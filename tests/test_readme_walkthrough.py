"""The README's walkthrough, block by block, exactly as written: chat with a hub model, fine-tune it,
merge two hub models, quantize and serve, compare. Offline: the two hub ids it names are put in a
Hugging Face cache built on disk (the real layout), holding nano and a perturbed copy of nano."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.checkpoint.hub_cache import add_repo

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## From a hub model to your own served variant"


def walkthrough_blocks() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```bash\n(.*?)```", text[start:end], flags=re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    """A working folder, its environment (offline hub cache, private QWENLAB_HOME) and the user's JSONL."""
    from qwenlab.checkpoint.reader import resolve_model_path
    from qwenlab.train.data import sft_records_from_task

    root = tmp_path_factory.mktemp("walkthrough")
    nano = resolve_model_path("nano")
    base = root / "base-model"
    base.mkdir()
    for file in nano.iterdir():
        if file.is_file() and file.name != "model.safetensors":
            (base / file.name).write_bytes(file.read_bytes())
    generator = torch.Generator().manual_seed(0)
    tensors = {k: v + 0.02 * v.float().std() * torch.randn(v.shape, generator=generator).to(v.dtype)
               for k, v in load_file(nano / "model.safetensors").items()}
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    cache = root / "hf-cache"
    add_repo(cache, "Qwen/Qwen2.5-0.5B-Instruct", nano, "c" * 40)
    add_repo(cache, "Qwen/Qwen2.5-0.5B", base, "d" * 40)
    work = root / "work"
    work.mkdir()
    with open(work / "my_chats.jsonl", "w") as f:
        for record in sft_records_from_task("reverse", 24, seed=0):
            f.write(json.dumps({"messages": record["prompt"] + record["completion"]}) + "\n")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "QWENLAB_HOME": str(root / "home"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return work, env


def run_block(number: int, walk, port: int | None = None) -> subprocess.CompletedProcess:
    work, env = walk
    block = walkthrough_blocks()[number - 1]
    if port is not None:
        assert "8000" in block
        block = block.replace("8000", str(port))
    process = subprocess.Popen(["bash", "-e", "-c", block], cwd=work, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=600)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the server of block 4, should `kill %1` not have run
        except ProcessLookupError:
            pass
    done = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    assert done.returncode == 0, f"block {number} failed:\n{block}\n{err[-3000:]}"
    return done


def test_the_readme_has_the_five_blocks():
    blocks = walkthrough_blocks()
    assert len(blocks) == 5
    assert all("Qwen/Qwen2.5-0.5B" in b for b in (blocks[0], blocks[1], blocks[2], blocks[3], blocks[4]))


def test_1_chat_with_a_hub_model(walk):
    done = run_block(1, walk)
    assert done.stdout.strip()  # the generated text
    assert "tokens/s" in done.stderr and "time to first token" in done.stderr  # --verbose


def test_2_to_5_fine_tune_merge_quantize_serve_compare(walk):
    work, _ = walk
    run_block(2, walk)
    assert (work / "runs/mine/adapter_model.safetensors").is_file()
    config = json.loads((work / "runs/mine/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"  # the id, not the snapshot folder

    run_block(3, walk)
    assert (work / "merged/config.json").is_file()
    lineage = json.loads((work / "merged/lineage.json").read_text())
    assert lineage["method"] == "slerp"

    done = run_block(4, walk, port=free_port())
    assert (work / "merged-int4/config.json").is_file()
    reply = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])
    assert reply["model"] == "mine" and reply["choices"][0]["message"]["content"]

    run_block(5, walk)
    report = (work / "my-compare/compare.md").read_text()
    assert "**Ship `" in report
    for name in ("Qwen/Qwen2.5-0.5B-Instruct", "mine", "merged", "merged-int4"):
        assert f"| {name} |" in report, name
    rows = {r["name"]: r for r in json.loads((work / "my-compare/compare.json").read_text())["rows"]}
    assert all(set(r["tasks"]) == {"arithmetic", "reverse"} for r in rows.values())
    assert all(r["task_n"] == {"arithmetic": 50, "reverse": 50} for r in rows.values())
