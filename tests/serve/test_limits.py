"""Limits and safety: every error code (400, 401, 404, 413, 429, 504), API keys, disconnects that cancel."""

import http.client
import json
import time

import openai
import pytest

from tests.serve.conftest import LiveServer, get_json, get_text, metric

KEY = "sk-test-key"
LONG = {"max_tokens": 150, "extra_body": {"ignore_eos": True}}  # >2 s with the slowed engine


@pytest.fixture(scope="module")
def limited(serve_models):
    from qwenlab.serve import ServeConfig, ServeLimits, build_app

    limits = ServeLimits(max_body_bytes=20_000, max_tokens=220, max_concurrency=2, api_key=KEY)
    app = build_app(ServeConfig(base=str(serve_models["base"]), served_model_name="base", max_batch=4,
                                adapters={"math": str(serve_models["math"])}, limits=limits))
    # 15 ms per forward pass: long generations last long enough to be cut off, without using the CPU
    app.state.registry.base.model.register_forward_pre_hook(lambda *_: time.sleep(0.015))
    with LiveServer(app, api_key=KEY) as live:
        yield live


def ask(client, content="hello", **kw):
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(model=kw.pop("model", "base"), messages=messages,
                                          **{"max_tokens": 4, "temperature": 0, **kw})


def wait_idle(server, within_s=3.0) -> float:
    """Seconds until no request is running or queued (fails past `within_s`)."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        health = get_json(server.url + "/health")
        if health["running"] == 0 and health["queued"] == 0:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"still busy after {within_s} s: {health}")


def cancelled(server) -> float:
    text = get_text(server.url + "/metrics")
    return metric(text, "qwenlab_requests_finished_total", engine="base", reason="cancelled")


def raw_post(server, path, body: bytes, headers: dict, chunked=False):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    if chunked:
        connection.request("POST", path, body=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]),
                           headers=headers, encode_chunked=True)
    else:
        connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_api_key(limited):
    with pytest.raises(openai.AuthenticationError) as error:
        ask(limited.client(api_key="wrong"))
    assert error.value.body["code"] == "invalid_api_key"
    status, body = raw_post(limited, "/v1/chat/completions", b"{}", {"Content-Type": "application/json"})
    assert status == 401 and body["error"]["type"] == "invalid_request_error"
    assert ask(limited.client()).choices[0].finish_reason in ("stop", "length")
    assert get_json(limited.url + "/health")["status"] == "ok"  # open: load balancers probe it
    assert "qwenlab_queue_depth" in get_text(limited.url + "/metrics")


def test_unknown_model_and_route_are_404(limited):
    with pytest.raises(openai.NotFoundError) as error:
        ask(limited.client(), model="no-such-model")
    assert error.value.body["code"] == "model_not_found" and error.value.body["param"] == "model"
    status, body = raw_post(limited, "/v1/nothing", b"{}", {"Authorization": f"Bearer {KEY}"})
    assert status == 404 and "message" in body["error"]


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 5}, "temperature"),
    ({"max_tokens": 221}, "max_tokens"),  # over the server's limit
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 9}, "n"),  # more choices than one request may have
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools.0.function.name"),
    ({"suffix": "x"}, "suffix"),  # OpenAI's, not implemented
    ({"no_such_field": 1}, "no_such_field"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_fields_are_400(limited, fields, param):
    extra = {k: v for k, v in fields.items() if k not in ("temperature", "max_tokens", "n", "stop")}
    named = {k: v for k, v in fields.items() if k not in extra}
    with pytest.raises(openai.BadRequestError) as error:
        ask(limited.client(), extra_body=extra or None, **named)
    assert error.value.body["param"] == param and error.value.body["type"] == "invalid_request_error"


def test_context_overflow_and_malformed_bodies_are_400(limited):
    with pytest.raises(openai.BadRequestError) as error:
        ask(limited.client(), content="hello world " * 200)
    assert error.value.body["code"] == "context_length_exceeded"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    assert raw_post(limited, "/v1/chat/completions", b"{not json", headers)[0] == 400
    status, body = raw_post(limited, "/v1/chat/completions", json.dumps({"model": "base", "messages": []}).encode(),
                            headers)
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = raw_post(limited, "/v1/completions", json.dumps({"model": "base", "prompt": [999999]}).encode(),
                            headers)
    assert status == 400 and body["error"]["param"] == "prompt"


def test_body_over_the_limit_is_413(limited):
    with pytest.raises(openai.APIStatusError) as error:
        ask(limited.client(), content="x" * 30_000)
    assert error.value.status_code == 413 and error.value.body["code"] == "request_too_large"
    body = json.dumps({"model": "base", "messages": [{"role": "user", "content": "x" * 30_000}]}).encode()
    status, reply = raw_post(limited, "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"}, chunked=True)
    assert status == 413 and reply["error"]["code"] == "request_too_large"


def test_concurrency_over_the_limit_is_429(limited):
    client = limited.client()
    streams = [client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], stream=True,
                                              **LONG) for _ in range(2)]
    try:
        for stream in streams:
            next(iter(stream))
        with pytest.raises(openai.RateLimitError) as error:
            ask(client)
        assert error.value.body["type"] == "rate_limit_error"
    finally:
        for stream in streams:
            stream.close()
    wait_idle(limited)
    assert ask(client).choices  # slots are given back


def test_a_vanished_streaming_client_cancels_its_generation(limited):
    before = cancelled(limited)
    stream = limited.client().chat.completions.create(model="math", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True, **LONG)
    next(chunk for chunk in stream if chunk.choices and chunk.choices[0].delta.content)  # it is running
    stream.close()
    assert wait_idle(limited, within_s=1.5) < 1.5  # the whole generation would take ~2 s
    assert cancelled(limited) == before + 1


def test_a_vanished_waiting_client_cancels_its_generation(limited):
    before = cancelled(limited)
    with pytest.raises(openai.APITimeoutError):
        ask(limited.client(timeout=0.4), **LONG)
    assert wait_idle(limited, within_s=1.5) < 1.5
    assert cancelled(limited) == before + 1


def test_request_timeout_is_504(limited):
    limits = limited.app.state.limits
    limits.request_timeout_s = 0.3
    try:
        with pytest.raises(openai.InternalServerError) as error:
            ask(limited.client(), **LONG)
        assert error.value.status_code == 504 and error.value.body["type"] == "timeout"
        with pytest.raises(openai.APIError):  # streamed: the error arrives as an SSE event
            for _ in limited.client().chat.completions.create(model="base", stream=True,
                                                              messages=[{"role": "user", "content": "hi"}], **LONG):
                pass
    finally:
        limits.request_timeout_s = 600.0
    wait_idle(limited)


def test_loopback_is_the_default_bind():
    from qwenlab.cli import build_parser
    from qwenlab.serve import ServeConfig
    from qwenlab.serve.server import is_loopback

    assert ServeConfig(base="x").host == "127.0.0.1"
    assert build_parser().parse_args(["serve", "x"]).host == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")


def test_unloading_an_adapter_in_use_is_409(limited):
    client = limited.client()
    stream = client.chat.completions.create(model="math", messages=[{"role": "user", "content": "hi"}], stream=True,
                                            **LONG)
    try:
        next(iter(stream))
        with pytest.raises(openai.ConflictError) as error:
            client.post("/unload_lora_adapter", body={"lora_name": "math"}, cast_to=object)
        assert error.value.body["code"] == "adapter_in_use"
    finally:
        stream.close()
    wait_idle(limited)


def test_an_engine_failure_is_a_500_and_the_server_goes_on(limited):
    model = limited.registry.base.model
    failing = model.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(openai.InternalServerError) as error:
            ask(limited.client())
        assert error.value.status_code == 500 and "boom" not in str(error.value.body)
    finally:
        failing.remove()
    assert ask(limited.client()).choices[0].finish_reason in ("stop", "length")
