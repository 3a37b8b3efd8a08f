"""`qwenlab serve` through the real entry point: starts, answers the openai client, stops on SIGINT."""

import signal
import subprocess
import sys
import time
import urllib.error

import openai

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


def test_serve_command_rejects_a_malformed_adapter_flag(serve_models, capsys):
    from qwenlab.cli import main

    assert main(["serve", str(serve_models["base"]), "--adapter", "nameonly"]) == 1
    assert "--adapter expects name=path" in capsys.readouterr().err
