"""Honest streaming: a request's first token reaches its client as soon as it exists, in a chunk of its
own, not together with the second token of the decode step that follows its prefill."""

import json
import urllib.request

from qwenlab.serve.requests import EngineRequest, SamplingParams
from tests.serve.test_engine import engine  # noqa: F401  (the fixture)


def test_first_token_is_delivered_before_the_decode_step_that_makes_the_second(engine):  # noqa: F811
    log = []
    engine.step_listeners.append(lambda: log.append("deliver"))
    try:
        ids = engine.tokenizer.encode("What is 12 + 7?")
        # logprobs=0: every token makes an event, even one whose text is held back (a partial character)
        engine.submit(EngineRequest(ids, SamplingParams(max_tokens=4, ignore_eos=True, logprobs=0),
                                    lambda event: log.append(event.kind)))
        engine.step()  # prefill (one chunk), first token, then the first decode step: all in one step
    finally:
        engine.step_listeners.pop()
    assert log[:3] == ["delta", "deliver", "delta"], log
    while engine.has_work():
        engine.step()


def test_a_streams_first_chunk_carries_one_token(server):
    body = {"model": "base", "prompt": "What is 12 + 7?", "max_tokens": 6, "temperature": 0, "stream": True,
            "logprobs": 0, "ignore_eos": True}
    request = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    tokens_per_chunk = []
    with urllib.request.urlopen(request, timeout=60) as response:
        for line in response:
            if line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice["logprobs"]:
                    tokens_per_chunk.append(len(choice["logprobs"]["tokens"]))
    assert tokens_per_chunk[0] == 1 and sum(tokens_per_chunk) == 6, tokens_per_chunk
