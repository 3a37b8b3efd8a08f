"""The server through the official `openai` client: models, chat and completions (streamed and not),
adapters and variants equal to the library's own generation, mixed-adapter batches, run-time loading."""

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.serve.conftest import get_json, get_text, metric

PROMPTS = ["What is 12 + 7?", "Reverse the word: apple", "hello world", "The answer is"]


def chat(client, model, prompt, max_tokens=12, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=max_tokens, temperature=0, **kw)


def stream_chat(client, model, prompt, max_tokens=12, **kw):
    """(text, finish_reason, usage) from a streamed chat completion."""
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, **kw)
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def test_models_lists_base_adapters_and_variants(server):
    cards = {m.id: m for m in server.client().models.list().data}
    assert set(cards) == {"base", "math", "reverse", "base-int8"}
    assert cards["math"].model_extra["parent"] == "base" and cards["math"].model_extra["kind"] == "adapter"
    assert cards["base-int8"].model_extra["kind"] == "variant"
    assert server.client().models.retrieve("reverse").id == "reverse"


@pytest.mark.parametrize("model", ["base", "math", "reverse", "base-int8"])
def test_chat_equals_library_generate(server, reference, model):
    client = server.client()
    for prompt in PROMPTS[:2]:
        expected = reference(model, prompt, chat=True, max_tokens=12)
        response = chat(client, model, prompt)
        assert response.choices[0].message.content == expected.text
        assert response.choices[0].finish_reason == expected.finish_reason
        assert response.usage.prompt_tokens == expected.prompt_tokens
        assert response.usage.completion_tokens == len(expected.token_ids)
        assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
        assert response.model == model
        text, finish, usage = stream_chat(client, model, prompt)
        assert (text, finish) == (expected.text, expected.finish_reason)
        assert usage.completion_tokens == len(expected.token_ids)


def test_adapters_change_the_output(server):
    client = server.client()
    texts = {m: chat(client, m, PROMPTS[0], max_tokens=10).choices[0].message.content
             for m in ("base", "math", "reverse")}
    assert len(set(texts.values())) == 3, texts


def test_completions_streamed_and_not(server, reference):
    client = server.client()
    expected = reference("math", "hello world", chat=False, max_tokens=9)
    response = client.completions.create(model="math", prompt="hello world", max_tokens=9, temperature=0)
    assert response.choices[0].text == expected.text and response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 9
    chunks = list(client.completions.create(model="math", prompt="hello world", max_tokens=9, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_seeded_sampling_equal_generate(server, reference):
    client = server.client()
    plain = reference("reverse", PROMPTS[1], chat=True, max_tokens=16)
    stop = plain.text[3:5]
    assert stop, plain.text
    expected = reference("reverse", PROMPTS[1], chat=True, max_tokens=16, stop=(stop,))
    response = chat(client, "reverse", PROMPTS[1], max_tokens=16, stop=[stop])
    assert response.choices[0].message.content == expected.text and stop not in expected.text
    assert response.choices[0].finish_reason == "stop"
    sampled = reference("math", PROMPTS[2], chat=True, max_tokens=12, temperature=1.3, top_k=40, seed=7)
    response = client.chat.completions.create(model="math", messages=[{"role": "user", "content": PROMPTS[2]}],
                                              max_tokens=12, temperature=1.3, seed=7, extra_body={"top_k": 40})
    assert response.choices[0].message.content == sampled.text


def test_mixed_adapter_batches_equal_one_at_a_time(server):
    client = server.client()
    jobs = [(model, prompt, 10 + 3 * i) for i, (model, prompt) in
            enumerate((m, p) for p in PROMPTS for m in ("base", "math", "reverse"))]
    alone = [chat(client, m, p, n).choices[0].message.content for m, p, n in jobs]
    before = get_text(server.url + "/metrics")
    started = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: stream_chat(client, *job)[0], jobs))
    wall = time.perf_counter() - started
    after = get_text(server.url + "/metrics")
    assert together == alone
    name = "qwenlab_generated_tokens_total"
    tokens = sum(metric(after, name, model=m) - metric(before, name, model=m) for m in ("base", "math", "reverse"))
    steps = (metric(after, "qwenlab_decode_step_seconds_count", engine="base")
             - metric(before, "qwenlab_decode_step_seconds_count", engine="base"))
    assert steps < tokens / 2, (steps, tokens)  # rows shared decode steps: requests were batched
    busy = metric(after, "qwenlab_engine_busy_seconds_total", engine="base") - metric(
        before, "qwenlab_engine_busy_seconds_total", engine="base")
    decoding = metric(after, "qwenlab_decode_step_seconds_sum", engine="base") - metric(
        before, "qwenlab_decode_step_seconds_sum", engine="base")
    assert decoding < busy < wall, (decoding, busy, wall)  # busy rounds hold the decode steps and the prefills


def test_load_and_unload_an_adapter_at_run_time(server, serve_models, reference):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        chat(client, "style", PROMPTS[0])
    client.post("/load_lora_adapter", body={"lora_name": "style", "lora_path": str(serve_models["style"])},
                cast_to=object)
    assert "style" in {m.id for m in client.models.list().data}
    expected = reference("style", PROMPTS[0], chat=True, max_tokens=12)
    assert chat(client, "style", PROMPTS[0]).choices[0].message.content == expected.text
    with pytest.raises(openai.BadRequestError):  # the name is taken
        client.post("/load_lora_adapter", body={"lora_name": "math", "lora_path": str(serve_models["style"])},
                    cast_to=object)
    with pytest.raises(openai.BadRequestError):  # not an adapter folder
        client.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": str(serve_models["base"])},
                    cast_to=object)
    client.post("/unload_lora_adapter", body={"lora_name": "style"}, cast_to=object)
    with pytest.raises(openai.NotFoundError):
        chat(client, "style", PROMPTS[0])
    with pytest.raises(openai.NotFoundError):
        client.post("/unload_lora_adapter", body={"lora_name": "style"}, cast_to=object)
    # the others are untouched by the module swaps
    assert chat(client, "math", PROMPTS[0]).choices[0].message.content == reference(
        "math", PROMPTS[0], chat=True, max_tokens=12).text


def test_health_and_metrics(server):
    chat(server.client(), "math", PROMPTS[3], max_tokens=4)
    health = get_json(server.url + "/health")
    assert health["status"] == "ok" and "math" in health["models"]
    text = get_text(server.url + "/metrics")
    assert metric(text, "qwenlab_requests_total", model="math", endpoint="chat") >= 1
    assert metric(text, "qwenlab_time_to_first_token_seconds_count", model="math") >= 1
    assert 'qwenlab_time_to_first_token_seconds_bucket{le="0.1",model="math"}' in text
    assert metric(text, "qwenlab_generation_tokens_per_second") > 0
    assert "qwenlab_queue_depth{engine=\"base\"}" in text and "qwenlab_running_requests" in text


def test_a_quantized_base_serves_adapters_mixed_in_one_batch(serve_models):
    """An int4 base with adapters (loaded unfused so LoRA can reach q/k/v and gate/up)."""
    from qwenlab.adapters import active_adapters, attach_adapter
    from qwenlab.checkpoint import open_checkpoint
    from qwenlab.model import GenerationConfig, generate, load_tokenizer
    from qwenlab.quant import load_quantized_model
    from qwenlab.serve import ServeConfig, build_app
    from tests.serve.conftest import LiveServer

    model = load_quantized_model(open_checkpoint(serve_models["int4"], validate=False), fuse=False)
    tokenizer = load_tokenizer(serve_models["int4"])
    stop_ids = tokenizer.stop_ids(open_checkpoint(serve_models["int4"], validate=False).generation_config)
    for name in ("math", "reverse"):
        attach_adapter(model, serve_models[name], name)
    expected = {}
    for name in ("int4", "math", "reverse"):
        with active_adapters(model, None if name == "int4" else name):
            expected[name] = generate(model, tokenizer, [PROMPTS[0]], GenerationConfig(max_new_tokens=10), chat=True,
                                      stop_ids=stop_ids)[0].text
    assert len(set(expected.values())) == 3
    config = ServeConfig(base=str(serve_models["int4"]), served_model_name="int4",
                         adapters={"math": str(serve_models["math"]), "reverse": str(serve_models["reverse"])})
    with LiveServer(build_app(config)) as live:
        client = live.client()
        with ThreadPoolExecutor(3) as pool:
            got = dict(zip(expected, pool.map(lambda m: stream_chat(client, m, PROMPTS[0], 10)[0], expected)))
    assert got == expected


def test_quantized_decode_runs_on_the_native_decode_stack(server, reference):
    """A lone row (and the n choices of one prompt) has no padding slot: the server's decode step runs in
    the one-call native decode stack that `qwenlab generate` uses, and the text is still the library's."""
    from qwenlab import native

    engine = server.registry.resolve("base-int8").engine
    if engine.model.decode_stack is None:
        assert not native.available()  # only where qwenlab's kernels cannot build
        return
    engine.cache.__dict__.pop("native_decode_table", None)
    expected = reference("base-int8", PROMPTS[0], chat=True, max_tokens=12)
    assert chat(server.client(), "base-int8", PROMPTS[0]).choices[0].message.content == expected.text
    assert engine.cache.native_decode_table[0] is engine.model.decode_stack  # built for the server's cache
