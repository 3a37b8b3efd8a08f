"""Prefix caching: reused KV gives the same greedy text as prefilling everything (base, adapters, quantized
bases), a chat's next turn prefills only what is new, adapters never share KV, the budget holds, and
/metrics shows hits."""

import pytest

from qwenlab.serve.engine import Engine
from qwenlab.serve.prefix_cache import BLOCK_TOKENS, PrefixCache
from qwenlab.serve.requests import EngineRequest, SamplingParams
from tests.serve.conftest import LiveServer, get_text, metric
from tests.serve.test_engine import Collector, run_until_done

SYSTEM = "You are a careful assistant: answer briefly."
QUESTIONS = ["What is 12 + 7?", "Reverse: apple", "hello world", "Count: banana"]


def build(serve_models, base: str, prefix_cache_mb: int, adapters=("math", "reverse"), variants=None):
    from qwenlab.serve import ServeConfig, ServeLimits, build_app

    config = ServeConfig(base=str(serve_models[base]), served_model_name="base", max_batch=8,
                         adapters={name: str(serve_models[name]) for name in adapters},
                         variants={name: str(serve_models[path]) for name, path in (variants or {}).items()},
                         prefix_cache_mb=prefix_cache_mb,
                         limits=ServeLimits(allow_adapter_dir=str(serve_models["base"].parent)))
    return LiveServer(build_app(config))


@pytest.fixture(scope="module")
def servers(serve_models):
    """The same models served with the prefix cache on and off."""
    with build(serve_models, "base", 64, variants={"base-int4": "int4"}) as on, \
            build(serve_models, "base", 0, variants={"base-int4": "int4"}) as off:
        yield on, off


def hits(server, engine="base") -> float:
    return metric(get_text(server.url + "/metrics"), "qwenlab_prefix_cache_hit_tokens_total", engine=engine)


def conversation(client, model, turns: int, max_tokens: int = 8, system: str = SYSTEM) -> tuple[list[str], list[int]]:
    """A chat that re-sends its growing history each turn: (answers, prompt tokens per turn)."""
    messages = [{"role": "system", "content": system}]
    answers, prompt_tokens = [], []
    for question in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": question})
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                  temperature=0)
        answer = response.choices[0].message.content
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
        prompt_tokens.append(response.usage.prompt_tokens)
    return answers, prompt_tokens


@pytest.mark.parametrize("model,engine", [("base", "base"), ("math", "base"), ("reverse", "base"),
                                          ("base-int4", "base-int4")])
def test_multi_turn_chat_equals_cache_off_and_prefills_only_the_new_turn(servers, model, engine):
    on, off = servers
    expected, _ = conversation(off.client(), model, 3)
    before = hits(on, engine)
    got, prompt_tokens = conversation(on.client(), model, 3)
    assert got == expected
    reused = hits(on, engine) - before
    # Each later turn re-sends the previous prompt and answer: all of it but the last partial block (and
    # the answer's closing tokens, which the template writes differently) comes from the cache.
    resent = sum(prompt_tokens[:-1])
    assert reused >= resent - len(prompt_tokens[1:]) * 3 * BLOCK_TOKENS, (reused, prompt_tokens)
    assert hits(off, engine) == 0


def test_quantized_base_with_adapter_equals_cache_off(serve_models):
    with build(serve_models, "int8", 64, adapters=("math",)) as on, \
            build(serve_models, "int8", 0, adapters=("math",)) as off:
        for model in ("base", "math"):
            expected, _ = conversation(off.client(), model, 3)
            assert conversation(on.client(), model, 3)[0] == expected
            assert conversation(on.client(), model, 3)[0] == expected  # now every turn's prompt is cached
        assert hits(on) > 0


def test_concurrent_requests_share_a_cached_prefix(servers):
    from concurrent.futures import ThreadPoolExecutor

    on, off = servers

    def ask(server, question):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        response = server.client().chat.completions.create(model="base", messages=messages, max_tokens=8,
                                                           temperature=0)
        return response.choices[0].message.content

    expected = [ask(off, q) for q in QUESTIONS]
    ask(on, "warm the cache with the system prompt")
    before = hits(on)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda q: ask(on, q), QUESTIONS)) == expected
    assert hits(on) - before >= 4 * BLOCK_TOKENS  # every request reused at least the system prompt's first block


def test_an_adapter_never_reuses_another_adapters_kv(servers, serve_models):
    on, off = servers
    client = on.client()
    system = "Only the math adapter has seen this system prompt so far."
    conversation(client, "math", 2, system=system)
    before = hits(on)
    answers, _ = conversation(client, "reverse", 1, system=system)  # same text as math's first turn
    assert hits(on) == before
    assert answers == conversation(off.client(), "reverse", 1, system=system)[0]
    conversation(client, "base", 1, system=system)
    assert hits(on) == before  # the base is a namespace of its own too
    conversation(client, "math", 1, system=system)
    assert hits(on) > before  # while math itself reuses it

    # An adapter unloaded and loaded again under the same name, from other weights, starts empty.
    def load(name, folder):
        client.post("/load_lora_adapter", body={"lora_name": name, "lora_path": str(folder)}, cast_to=object)

    def unload(name):
        client.post("/unload_lora_adapter", body={"lora_name": name}, cast_to=object)

    load("swap", serve_models["style"])
    conversation(client, "swap", 2, system=system)
    unload("swap")
    load("swap", serve_models["math"])
    before = hits(on)
    assert conversation(client, "swap", 1, system=system)[0] == conversation(off.client(), "math", 1, system=system)[0]
    assert hits(on) == before
    unload("swap")


def test_metrics_show_hit_rate_and_cached_tokens(servers):
    on, _ = servers
    conversation(on.client(), "base", 2)
    text = get_text(on.url + "/metrics")
    assert 0 < metric(text, "qwenlab_prefix_cache_hit_rate") <= 1
    assert metric(text, "qwenlab_prefix_cache_cached_tokens") >= 2 * BLOCK_TOKENS
    assert metric(text, "qwenlab_prefix_cache_bytes") > 0
    assert metric(text, "qwenlab_prefix_cache_queried_tokens_total", engine="base") >= \
        metric(text, "qwenlab_prefix_cache_hit_tokens_total", engine="base") > 0


def test_eviction_keeps_the_budget_and_drops_least_recently_used(serve_models):
    from qwenlab.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(serve_models["base"])
    model = load_model(serve_models["base"])
    config = model.config
    block_bytes = config.num_hidden_layers * 2 * config.num_key_value_heads * BLOCK_TOKENS * config.head_dim * 4
    cache = PrefixCache(budget_bytes=12 * block_bytes)
    engine = Engine("base", model, tokenizer, tokenizer.stop_ids(), max_batch=3, max_context=256, prefix_cache=cache)
    plain = Engine("base", model, tokenizer, tokenizer.stop_ids(), max_batch=3, max_context=256)
    prompts = [[(7 * i + j) % 250 + 3 for j in range(4 * BLOCK_TOKENS + 5)] for i in range(5)]  # 4 blocks each

    def run(engine, ids):
        collector = Collector()
        engine.submit(EngineRequest(ids, SamplingParams(max_tokens=6, ignore_eos=True), collector))
        run_until_done(engine, [collector])
        return "".join(collector.text)

    for ids in prompts:
        assert run(engine, ids) == run(plain, ids)
        assert cache.bytes <= cache.budget_bytes
    assert cache.evicted_blocks > 0
    # The last prompts are still cached whole; the first ones were evicted.
    assert cache.match(engine.namespace(None), prompts[-1], len(prompts[-1]))[1].shape[3] == 4 * BLOCK_TOKENS
    assert cache.match(engine.namespace(None), prompts[0], len(prompts[0]))[1] is None
    before = cache.hit_tokens
    assert run(engine, prompts[-2]) == run(plain, prompts[-2])
    assert cache.hit_tokens - before == 4 * BLOCK_TOKENS


def test_prefix_cache_mb_is_checked(serve_models):
    from qwenlab.errors import QwenlabError
    from qwenlab.serve import ServeConfig

    with pytest.raises(QwenlabError, match="--prefix-cache-mb"):
        ServeConfig(base=str(serve_models["base"]), prefix_cache_mb=-1).check()


def test_the_prefill_budget_counts_only_uncached_tokens(serve_models):
    """Prompts that share a long cached prefix are prefilled together, though their full lengths would
    exceed --max-prefill-tokens: only their new tails are computed."""
    from qwenlab.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(serve_models["base"])
    model = load_model(serve_models["base"])
    engine = Engine("base", model, tokenizer, tokenizer.stop_ids(), max_batch=4, max_context=256,
                    max_prefill_tokens=64, prefix_cache=PrefixCache(1 << 24))
    plain = Engine("base", model, tokenizer, tokenizer.stop_ids(), max_batch=4, max_context=256, max_prefill_tokens=64)
    shared = [(5 * j) % 250 + 3 for j in range(6 * BLOCK_TOKENS)]
    warm = Collector()
    engine.submit(EngineRequest(shared + [9], SamplingParams(max_tokens=2, ignore_eos=True), warm))
    run_until_done(engine, [warm])
    prompts = [shared + [10 + i, 20 + i, 30 + i] for i in range(3)]  # 99 tokens each, 96 of them cached
    results = {}
    for name, server in (("cached", engine), ("plain", plain)):
        collectors = [Collector() for _ in prompts]
        for ids, collector in zip(prompts, collectors):
            server.submit(EngineRequest(ids, SamplingParams(max_tokens=5, ignore_eos=True), collector))
        server.step()
        results[name] = collectors
        if name == "cached":
            assert not server.waiting and server.rows and len(server.rows) == 3  # one prefill of 3 tails
        else:
            assert len(server.waiting) == 2  # 99 > 64: one at a time
        run_until_done(server, collectors)
    assert ["".join(c.text) for c in results["cached"]] == ["".join(c.text) for c in results["plain"]]
