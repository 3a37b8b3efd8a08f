"""One bad request never hurts the others: values that would poison a batch are refused with 400 at the
schema, and a fault inside one row (set-up, sampling, emitting, a prefill) ends only that row's request
while every other row's text stays what it is when it runs alone."""

import http.client
import json
import threading
import time

import pytest

from qwenlab.serve.engine import Engine, EngineLoop
from qwenlab.serve.requests import EngineRequest, SamplingParams
from tests.serve.conftest import LiveServer, get_json, get_text, metric
from tests.serve.test_engine import Collector, run_until_done

# Each body is raw JSON text: Python's json reads NaN, Infinity and 1e999 (= inf) in a request body.
POISONED = [
    ('"seed": 9223372036854775808', "seed"),  # 2^63: torch's manual_seed overflows
    ('"seed": -1', "seed"),
    ('"temperature": 1e-300', "temperature"),  # logits / 1e-300 = inf -> NaN probabilities
    ('"repetition_penalty": 1e-300', "repetition_penalty"),
    ('"temperature": NaN', "temperature"),
    ('"temperature": -Infinity', "temperature"),
    ('"top_p": NaN', "top_p"),
    ('"top_p": 1e999', "top_p"),
    ('"repetition_penalty": Infinity', "repetition_penalty"),
    ('"seed": 1e999', "seed"),
    ('"logit_bias": {"5": NaN}', "logit_bias.5"),
    ('"presence_penalty": NaN', "presence_penalty"),
    ('"metadata": {"weights": [1.0, Infinity]}', "metadata.weights.1"),
]
STREAM = {"model": "base", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 150,
          "temperature": 0.9, "seed": 11, "top_k": 50, "repetition_penalty": 1.1, "ignore_eos": True,
          "stream": True}


@pytest.fixture(scope="module")
def slow_server(serve_models):
    """The base, each forward pass slowed by 15 ms so a stream is still running while others arrive."""
    from qwenlab.serve import ServeConfig, build_app

    app = build_app(ServeConfig(base=str(serve_models["base"]), served_model_name="base", max_batch=8))
    app.state.registry.base.model.register_forward_pre_hook(lambda *_: time.sleep(0.015))
    with LiveServer(app) as live:
        yield live


def post(server, path: str, body: str) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", path, body=body.encode(), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


class Stream:
    """A streamed chat read chunk by chunk: .first() waits until it runs, .rest() returns the text."""

    def __init__(self, server, body: dict):
        self.connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        self.connection.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                                headers={"Content-Type": "application/json"})
        self.response = self.connection.getresponse()
        assert self.response.status == 200
        self.parts, self.finish, self.error = [], None, None

    def _next(self) -> bool:
        line = self.response.readline().decode()
        if not line:
            return False
        if not line.startswith("data: ") or line.strip() == "data: [DONE]":
            return line.strip() != "data: [DONE]"
        event = json.loads(line[6:])
        if "error" in event:
            self.error = event["error"]
            return True
        for choice in event["choices"]:
            self.parts.append(choice["delta"].get("content") or "")
            self.finish = choice.get("finish_reason") or self.finish
        return True

    def first(self) -> None:
        while not "".join(self.parts) and self._next():
            pass

    def rest(self) -> str:
        while self._next():
            pass
        self.connection.close()
        return "".join(self.parts)


def errors(server) -> float:
    return metric(get_text(server.url + "/metrics"), "qwenlab_requests_finished_total", engine="base", reason="error")


def test_poisoned_values_are_400_and_a_concurrent_stream_is_unharmed(slow_server):
    alone = Stream(slow_server, STREAM)
    alone_text = alone.rest()
    assert alone.finish == "length" and alone.error is None and alone_text
    errors_before = errors(slow_server)

    together = Stream(slow_server, STREAM)
    together.first()  # it is running in the batch now
    for field, param in POISONED:
        body = '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, %s}' % field
        status, reply = post(slow_server, "/v1/chat/completions", body)
        assert status == 400, (field, reply)
        assert reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error", (field, reply)
        assert "\n" not in reply["error"]["message"]
    in_flight = get_json(slow_server.url + "/health")["running"]
    assert in_flight == 1, "the stream ended before every poisoned request was sent"  # so they overlapped
    assert together.rest() == alone_text and together.finish == "length" and together.error is None
    assert errors(slow_server) == errors_before  # none of them reached the engine


def test_poisoned_completions_and_adapter_bodies_are_400(slow_server):
    status, reply = post(slow_server, "/v1/completions",
                         '{"model": "base", "prompt": "hi", "temperature": 0.000001}')
    assert status == 400 and reply["error"]["param"] == "temperature" and "1e-05" in reply["error"]["message"]
    status, reply = post(slow_server, "/v1/completions", '{"model": "base", "prompt": [1, 2], "seed": NaN}')
    assert status == 400 and reply["error"]["param"] == "seed"
    status, reply = post(slow_server, "/v1/load_lora_adapter", '{"lora_name": "x", "lora_path": "y", "r": NaN}')
    assert status == 400 and reply["error"]["param"] == "r"
    # the bounds themselves are accepted: 0 (greedy), 1e-5, and a penalty at each end of its range
    for fields in ('"temperature": 0', '"temperature": 1e-5', '"repetition_penalty": 0.01',
                   '"repetition_penalty": 100', '"seed": 9223372036854775807'):
        status, reply = post(slow_server, "/v1/completions", '{"model": "base", "prompt": "hi", "max_tokens": 2, %s}'
                             % fields)
        assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length"), (fields, reply)


# ---- faults inside one row, past the schema --------------------------------------------------------
class RaisingCollector(Collector):
    """A receiver whose callback raises on its 3rd text delta (a broken client-side hand-off)."""

    def __init__(self):
        super().__init__()
        self.deltas = 0

    def __call__(self, event):
        if event.kind == "delta":
            self.deltas += 1
            if self.deltas == 3:
                raise RuntimeError("receiver failed")
        super().__call__(event)


POISON_PROMPT = [7, 7, 7, 7, 7, 7, 7, 3]


def new_engine(paths, max_batch: int) -> Engine:
    from qwenlab.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(paths["base"])
    return Engine("base", load_model(paths["base"]), tokenizer, tokenizer.stop_ids(), max_batch=max_batch,
                  max_context=256)


@pytest.fixture(scope="module")
def engine(serve_models):
    engine = new_engine(serve_models, max_batch=8)

    def fail_on_poison_prompt(_module, args, kwargs):
        # A forward pass that fails whenever one particular prompt is prefilled, as a fault tied to one
        # request's input would: the others prefilled with it must be retried and survive.
        tokens = args[0] if args else kwargs["input_ids"]
        if tokens.shape[1] >= len(POISON_PROMPT) and any(
                row[-len(POISON_PROMPT):].tolist() == POISON_PROMPT for row in tokens):
            raise RuntimeError("poisoned prefill")

    engine.model.register_forward_pre_hook(fail_on_poison_prompt, with_kwargs=True)
    return engine


GOOD = [([5, 9, 2, 7], SamplingParams(max_tokens=20, ignore_eos=True)),
        ([3, 3, 8, 1, 4], SamplingParams(max_tokens=25, temperature=0.8, top_k=40, seed=3, ignore_eos=True)),
        ([4, 6, 6], SamplingParams(max_tokens=15, temperature=1.2, top_p=0.9, repetition_penalty=1.3, seed=9,
                                   ignore_eos=True))]
# What the schema refuses, handed to the engine directly: each must end alone.
BAD = {"seed beyond 64 bits (set-up)": ([5, 6], SamplingParams(max_tokens=10, seed=2**64)),
       "temperature 1e-300 (sampling)": ([5, 6], SamplingParams(max_tokens=10, temperature=1e-300)),
       "NaN temperature (sampling)": ([8, 2, 2], SamplingParams(max_tokens=10, temperature=float("nan"))),
       "prefill fault": (POISON_PROMPT, SamplingParams(max_tokens=10))}


def run_alone(engine, prompt, params) -> str:
    collector = Collector()
    engine.submit(EngineRequest(list(prompt), params, collector))
    run_until_done(engine, [collector])
    assert collector.finish == "length"
    return "".join(collector.text)


def test_a_row_fault_ends_only_that_row(engine):
    expected = [run_alone(engine, prompt, params) for prompt, params in GOOD]
    good = [Collector() for _ in GOOD]
    bad = {name: Collector() for name in BAD}
    raising = RaisingCollector()
    # Good and bad requests interleaved, so they share prefills and decode steps.
    engine.submit(EngineRequest(list(GOOD[0][0]), GOOD[0][1], good[0]))
    for name, (prompt, params) in BAD.items():
        engine.submit(EngineRequest(list(prompt), params, bad[name]))
    engine.submit(EngineRequest(list(GOOD[1][0]), GOOD[1][1], good[1]))
    engine.submit(EngineRequest([2, 4, 6], SamplingParams(max_tokens=12, ignore_eos=True), raising))
    engine.step()  # one shared prefill for all of them
    engine.submit(EngineRequest(list(GOOD[2][0]), GOOD[2][1], good[2]))  # joins the running batch
    run_until_done(engine, good + list(bad.values()) + [raising])
    for name, collector in bad.items():
        assert collector.finish.startswith("error: "), name
        assert "other requests are unaffected" in collector.finish, name
    # it left the batch at its fault, told with an error event; its first two deltas had arrived
    assert raising.deltas == 3 and len(raising.text) == 2 and raising.finish.startswith("error: ")
    assert ["".join(c.text) for c in good] == expected
    assert all(c.finish == "length" for c in good)
    assert engine.rows == [] and engine.cache.rows == 0
    assert run_alone(engine, *GOOD[0]) == expected[0]  # and the engine serves on


def test_a_failed_decode_pass_ends_its_rows_and_the_engine_serves_on(serve_models):
    """A fault in the shared forward pass cannot be pinned on one row: the running rows end, the
    request still waiting for a row does not, and the engine thread goes on serving."""
    engine = new_engine(serve_models, max_batch=2)
    expected = run_alone(engine, *GOOD[2])
    failed = []

    def fail_one_decode_pass(_module, args):
        if args[0].shape[1] == 1 and not failed:  # a decode step: one token per row
            failed.append(True)
            raise RuntimeError("decode pass failed")

    engine.model.register_forward_pre_hook(fail_one_decode_pass)
    running, waiting = [Collector(), Collector()], Collector()
    for collector, (prompt, params) in zip(running, GOOD[:2]):
        engine.submit(EngineRequest(list(prompt), params, collector))
    engine.submit(EngineRequest(list(GOOD[2][0]), GOOD[2][1], waiting))  # no free row: it waits
    loop = EngineLoop([engine])
    loop.start()
    try:
        assert all(c.done.wait(30) for c in running + [waiting])
        assert failed and loop.is_alive()
        assert [c.finish for c in running] == ["error: internal error in the generation engine"] * 2
        assert waiting.finish == "length" and "".join(waiting.text) == expected
        later = Collector()
        engine.submit(EngineRequest(list(GOOD[2][0]), GOOD[2][1], later))
        assert later.done.wait(30) and "".join(later.text) == expected
    finally:
        loop.stop()


def test_a_row_fault_in_the_live_server_ends_only_that_request(slow_server):
    """Requests the schema would refuse, put straight into the running server's engine next to a stream."""
    alone_text = Stream(slow_server, STREAM).rest()
    engine = slow_server.registry.base
    together = Stream(slow_server, STREAM)
    together.first()
    outcomes, done = [], threading.Event()

    def receive(event):
        if event.kind != "delta":
            outcomes.append(event.kind)
            if len(outcomes) == 2:
                done.set()

    engine.submit(EngineRequest([5, 6], SamplingParams(max_tokens=10, seed=2**64), receive))
    engine.submit(EngineRequest([5, 6], SamplingParams(max_tokens=10, temperature=1e-300), receive))
    assert done.wait(30) and outcomes == ["error", "error"]
    assert together.rest() == alone_text and together.finish == "length" and together.error is None
    status, reply = post(slow_server, "/v1/completions", '{"model": "base", "prompt": "hi", "max_tokens": 3}')
    assert status == 200 and reply["usage"]["completion_tokens"] >= 1
