"""Fixtures: a tiny quantizable base, PEFT adapters over it, int8/int4 copies, and live servers on loopback."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tests.adapters.conftest import make_peft_adapter
from tests.conftest import build_hf_model

ADAPTERS = ("math", "reverse", "style")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared, busy machine OpenMP's
    hand-offs make each small matmul ~50x slower; restored after each module."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory) -> dict[str, Path]:
    """base (dims divisible by 32, so it quantizes), three PEFT adapters, and its int8 / int4 copies."""
    from qwenlab.quant import quantize_model

    root = tmp_path_factory.mktemp("serve")
    paths = {"base": root / "base"}
    build_hf_model(paths["base"], hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, seed=5)
    for seed, name in enumerate(ADAPTERS):
        paths[name] = root / name
        make_peft_adapter(paths["base"], paths[name], r=4, alpha=8, seed=seed + 1)
    for bits in (8, 4):
        paths[f"int{bits}"] = quantize_model(paths["base"], root / f"int{bits}", bits=bits, group_size=32,
                                             progress=False)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on a free loopback port, in a thread; stopped on exit."""

    def __init__(self, app, api_key: str | None = None):
        import uvicorn

        self.app, self.api_key, self.port = app, api_key, free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw):
        import openai

        kw.setdefault("api_key", self.api_key or "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=kw.pop("timeout", 60), **kw)

    @property
    def registry(self):
        return self.app.state.registry

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def get_json(url: str, headers: dict | None = None) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
        return json.loads(response.read())


def get_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def metric(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_text = key.partition("{")
        if sample == name and ",".join(sorted(label_text.rstrip("}").split(","))) == wanted:
            return float(value)
    return 0.0


@pytest.fixture(scope="module")
def server(serve_models):
    """The base with two adapters at start-up and the int8 copy as a variant; run-time loading is
    allowed from the folder that holds the test models."""
    from qwenlab.serve import ServeConfig, ServeLimits, build_app

    config = ServeConfig(base=str(serve_models["base"]), served_model_name="base",
                         adapters={"math": str(serve_models["math"]), "reverse": str(serve_models["reverse"])},
                         variants={"base-int8": str(serve_models["int8"])}, max_batch=8,
                         limits=ServeLimits(allow_adapter_dir=str(serve_models["base"].parent)))
    with LiveServer(build_app(config)) as live:
        yield live


class Reference:
    """The library's own greedy generation (what `qwenlab generate` prints), with an adapter applied."""

    def __init__(self, paths: dict[str, Path]):
        from qwenlab.adapters import attach_adapter
        from qwenlab.checkpoint import open_checkpoint
        from qwenlab.model import load_model, load_tokenizer
        from qwenlab.quant import load_quantized_model

        self.tokenizer = load_tokenizer(paths["base"])
        self.base = load_model(paths["base"])
        for name in ADAPTERS:
            attach_adapter(self.base, paths[name], name)
        self.int8 = load_quantized_model(open_checkpoint(paths["int8"], validate=False))
        self.stop_ids = self.tokenizer.stop_ids(open_checkpoint(paths["base"]).generation_config)  # as the CLI does

    def __call__(self, model_id: str, prompt: str, *, chat: bool, max_tokens: int, **config):
        from qwenlab.adapters import active_adapters
        from qwenlab.model import GenerationConfig, generate

        model = self.int8 if model_id == "base-int8" else self.base
        adapter = model_id if model_id in ADAPTERS else None
        with active_adapters(self.base, adapter):
            return generate(model, self.tokenizer, [prompt], GenerationConfig(max_new_tokens=max_tokens, **config),
                            chat=chat, stop_ids=self.stop_ids)[0]


@pytest.fixture(scope="session")
def reference(serve_models) -> Reference:
    return Reference(serve_models)
