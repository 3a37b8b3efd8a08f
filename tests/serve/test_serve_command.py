"""`qwenlab serve` through the real entry point: starts, answers the openai client, stops on SIGINT."""

import signal
import subprocess
import sys
import time
import urllib.error

import openai
import pytest

from tests.serve.conftest import free_port, get_json


def test_serve_command_answers_and_stops(serve_models, reference):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "qwenlab", "serve", str(serve_models["base"]), "--served-model-name", "base",
         "--adapter", f"reverse={serve_models['reverse']}", "--variant", f"base-int4={serve_models['int4']}",
         "--port", str(port), "--threads", "1", "--api-key", "k"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if get_json(f"http://127.0.0.1:{port}/health")["status"] == "ok":
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"base", "reverse", "base-int4"}
        response = client.chat.completions.create(model="reverse", messages=[{"role": "user", "content": "hello"}],
                                                  max_tokens=8, temperature=0)
        assert response.choices[0].message.content == reference("reverse", "hello", chat=True, max_tokens=8).text
        assert client.chat.completions.create(model="base-int4", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3).usage.completion_tokens <= 3
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert "without --api-key" not in output  # loopback, and a key: nothing to warn about


def test_serve_command_rejects_a_malformed_adapter_flag(serve_models, capsys):
    from qwenlab.cli import main

    assert main(["serve", str(serve_models["base"]), "--adapter", "=x"]) != 0
    assert "--adapter expects name=path or a folder" in capsys.readouterr().err


def test_a_bare_adapter_path_is_served_under_its_folder_name():
    from qwenlab.serve.server import parse_named_paths

    assert parse_named_paths(["runs/math/", "org/lora", "x=y"], "--adapter") == {"math": "runs/math/",
                                                                                  "lora": "org/lora", "x": "y"}


@pytest.mark.parametrize("flags, named", [
    (["--max-batch", "0"], "--max-batch"),
    (["--max-batch", "100000000"], "--max-batch"),
    (["--port", "-1"], "--port"),
    (["--port", "0"], "--port"),
    (["--port", "65536"], "--port"),
    (["--max-prefill-tokens", "0"], "--max-prefill-tokens"),
    (["--threads", "0"], "--threads"),
    (["--threads", "-4"], "--threads"),
    (["--max-context", "1"], "--max-context"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--default-max-tokens", "-1"], "--default-max-tokens"),
    (["--max-concurrency", "0"], "--max-concurrency"),
    (["--max-body-size", "0"], "--max-body-size"),
    (["--max-body-size=-5MB"], "--max-body-size"),
    (["--max-body-size", "lots"], "--max-body-size"),
    (["--max-body-size", "infMB"], "--max-body-size"),
    (["--request-timeout", "0"], "--request-timeout"),
    (["--request-timeout", "nan"], "--request-timeout"),
    (["--request-timeout", "inf"], "--request-timeout"),
    (["--max-adapters", "0"], "--max-adapters"),
    (["--dtype", "int3"], "--dtype"),
    (["--host", ""], "--host"),
    (["--served-model-name", " "], "--served-model-name"),
    (["--allow-adapter-dir", "/no/such/dir"], "--allow-adapter-dir"),
    (["--max-adapters", "1", "--adapter", "a=x", "--adapter", "b=y"], "--max-adapters"),
])
def test_nonsense_flags_are_refused_at_start(tmp_path, capsys, flags, named):
    """Refused before anything loads: the base does not even exist, so only the flag check can answer."""
    from qwenlab.cli import main

    assert main(["serve", str(tmp_path / "no-model"), *flags]) != 0
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err and "Traceback" not in err, err
    assert "no-model" not in err  # it stopped at the flag, before looking at the model


def wait_for_health(process, port: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, "the server exited"
        try:
            if get_json(f"http://127.0.0.1:{port}/health")["status"] == "ok":
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def test_a_non_loopback_bind_without_a_key_warns(serve_models):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "qwenlab", "serve", str(serve_models["base"]), "--host", "0.0.0.0", "--port", str(port),
         "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_health(process, port)
    finally:
        process.send_signal(signal.SIGINT)
        err = process.communicate(timeout=30)[1]
    warnings = [line for line in err.splitlines() if "without --api-key" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: serving on 0.0.0.0"), err


def test_a_max_context_beyond_the_model_is_refused_not_lowered(serve_models):
    from qwenlab.errors import QwenlabError
    from qwenlab.serve.registry import load_engine

    positions = load_engine("base", serve_models["base"]).max_context
    with pytest.raises(QwenlabError, match=f"--max-context {positions + 1} is beyond the model's context of {positions}"):
        load_engine("base", serve_models["base"], max_context=positions + 1)
    assert load_engine("base", serve_models["base"], max_context=positions - 1).max_context == positions - 1
