"""The engine without HTTP: continuous batching with rows joining, leaving and being compacted,
per-row adapters, cancellation - each request's text equal to generating it alone."""

import threading

import pytest
import torch

from qwenlab.serve.batch_cache import BatchKVCache
from qwenlab.serve.engine import Engine
from qwenlab.serve.requests import EngineRequest, SamplingParams
from tests.conftest import CountedCalls
from tests.serve.conftest import ADAPTERS


@pytest.fixture(scope="module")
def engine(serve_models):
    from qwenlab.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(serve_models["base"])
    engine = Engine("base", load_model(serve_models["base"]), tokenizer, tokenizer.stop_ids(), max_batch=3,
                    max_context=256)
    for name in ADAPTERS:
        engine.adapters.attach(name, engine.adapters.read(serve_models[name]), str(serve_models[name]))
    return engine


class Collector:
    def __init__(self):
        self.text, self.finish, self.done = [], None, threading.Event()

    def __call__(self, event):
        if event.kind == "delta":
            self.text.append(event.text)
        else:
            self.finish = event.finish_reason if event.kind == "finish" else "error: " + event.text
            self.done.set()


def run_until_done(engine, collectors, max_steps=5000):
    for _ in range(max_steps):
        if all(c.done.is_set() for c in collectors):
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def alone(model, tokenizer, prompt_ids, adapter, max_tokens) -> str:
    """The library's generation of one request by itself."""
    from qwenlab.adapters import active_adapters
    from qwenlab.model import GenerationConfig
    from qwenlab.model.generate import stream_generate

    with active_adapters(model, adapter):
        events = stream_generate(model, tokenizer, [prompt_ids], GenerationConfig(max_new_tokens=max_tokens),
                                 tokenizer.stop_ids())
        return "".join(e.text for e in events)


def test_rows_join_leave_and_compact_like_one_at_a_time(engine, reference):
    # A tiny cache that must grow and compact many times while rows come and go.
    engine.cache = BatchKVCache(engine.model.config, engine.max_batch, engine.max_context, engine.model.dtype,
                                initial_slots=4)
    tokenizer = engine.tokenizer
    texts = ["What is 12 + 7?", "hello", "Reverse the word: apple apple apple", "The answer is 19.",
             "hello world hello world", "a", "sort these letters: d c b a", "count the letter l in hello"]
    jobs = [(tokenizer.encode(t), [None, *ADAPTERS][i % 4], 5 + (7 * i) % 23) for i, t in enumerate(texts)]
    collectors = []
    for i, (ids, adapter, max_tokens) in enumerate(jobs):
        collectors.append(Collector())
        engine.submit(EngineRequest(ids, SamplingParams(max_tokens=max_tokens), collectors[-1], adapter=adapter))
        for _ in range(i % 3):  # stagger arrivals: some join a running batch mid-flight
            engine.step()
    run_until_done(engine, collectors)
    assert engine.rows == [] and engine.cache.rows == 0
    for (ids, adapter, max_tokens), collector in zip(jobs, collectors):
        assert collector.finish in ("stop", "length")
        assert "".join(collector.text) == alone(reference.base, tokenizer, ids, adapter, max_tokens), adapter


def test_cancelled_rows_leave_the_batch(engine):
    collectors = [Collector() for _ in range(3)]
    requests = [EngineRequest([5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True), c) for c in collectors]
    for request in requests:
        engine.submit(request)
    for _ in range(3):
        engine.step()
    assert len(engine.rows) == 3
    requests[1].cancel()
    engine.step()
    assert [row.request for row in engine.rows] == [requests[0], requests[2]]
    run_until_done(engine, [collectors[0], collectors[2]])
    assert not collectors[1].done.is_set() and collectors[0].finish == "length"


def test_compaction_keeps_every_rows_keys_in_order():
    from qwenlab.checkpoint.config import Qwen2Config
    from qwenlab.model.kv_cache import KVCache

    config = Qwen2Config(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    cache = BatchKVCache(config, max_rows=3, max_slots=128, dtype=torch.float32, initial_slots=4)
    head_dim = config.head_dim
    for length in (3, 6, 2):  # rows of different lengths, each its own prefill
        source = KVCache.for_model(config, 1, length, torch.float32)
        source.reserve(torch.ones(1, length, dtype=torch.bool))
        keys = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1).expand(1, 1, length, head_dim)
        keys = keys + 100 * length
        source.write(0, 0, keys, keys)
        cache.add_row(source, 0)
    cache.remove_row(0)  # row 2 moves into row 0
    cache.make_room(60)  # forces compaction, then growth
    for row, length in ((0, 2), (1, 6)):
        slots = cache.valid[row, : cache.length].nonzero().squeeze(1)
        assert cache.keys[0][row, 0, slots, 0].tolist() == [100 * length + i for i in range(length)]
    assert cache.length == 6 and cache.capacity >= 66


def test_slot_buffers_only_where_every_rows_padding_is_leading():
    """The native decode kernels attend row b from slot starts[b] (its count of leading padding slots): the
    cache offers its buffers for left-padded rows, and keeps every row's padding leading when a longer
    newcomer joins."""
    from qwenlab.checkpoint.config import Qwen2Config
    from qwenlab.model.kv_cache import KVCache, leading_padding

    config = Qwen2Config(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    cache = BatchKVCache(config, max_rows=3, max_slots=128, dtype=torch.float32, initial_slots=16)
    source = KVCache.for_model(config, 2, 5, torch.float32)
    source.reserve(torch.tensor([[True] * 5, [False, False, True, True, True]]))  # one left-padded prefill
    keys = torch.arange(1, 11, dtype=torch.float32).view(2, 1, 5, 1).expand(2, 1, 5, config.head_dim)
    source.write(0, 0, keys, keys)  # distinct keys per row and slot
    cache.add_row(source, 0)
    cache.add_row(source, 1)
    cache.reserve(torch.ones(2, 1, dtype=torch.bool))  # a decode step's slot
    assert cache.has_padding and leading_padding(cache).tolist() == [0, 2]
    assert cache.slot_buffers() is not None
    longer = KVCache.for_model(config, 1, 8, torch.float32)
    longer.reserve(torch.ones(1, 8, dtype=torch.bool))
    keys_before = [cache.keys[0][row, 0, cache.row_slots(row), 0].clone() for row in range(2)]
    assert keys_before[1][:3].tolist() == [8, 9, 10]
    cache.add_row(longer, 0)  # longer than the batch: the older rows move right, their padding still leading
    assert cache.length == 8 and leading_padding(cache).tolist() == [2, 4, 0] and cache.slot_buffers() is not None
    for row in range(2):  # each older row's keys moved with its slots, in order
        assert torch.equal(cache.keys[0][row, 0, cache.row_slots(row), 0], keys_before[row])
    cache.remove_row(2)
    cache.compact()  # the padding every row had is reclaimed: right-aligned again
    assert cache.length == 6 and leading_padding(cache).tolist() == [0, 2] and cache.slot_buffers() is not None
    for row in range(2):
        assert torch.equal(cache.keys[0][row, 0, cache.row_slots(row), 0], keys_before[row])


def test_adapters_with_different_targets_and_ranks_mix_in_one_batch(serve_models, tmp_path):
    """q|k|v and gate|up share one stacked A per batch: adapters that target only some members
    (PEFT's q_proj/v_proj default, an MLP-only one) must still add exactly their own deltas."""
    from qwenlab.adapters import attach_adapter
    from qwenlab.model import load_model, load_tokenizer
    from tests.adapters.conftest import make_peft_adapter

    paths = {"all": serve_models["math"], "qv": tmp_path / "qv", "mlp": tmp_path / "mlp"}
    make_peft_adapter(serve_models["base"], paths["qv"], r=2, alpha=8, targets=("q_proj", "v_proj"), seed=11)
    make_peft_adapter(serve_models["base"], paths["mlp"], r=3, alpha=6, targets=("up_proj", "down_proj"), seed=12)
    tokenizer = load_tokenizer(serve_models["base"])
    engine = Engine("base", load_model(serve_models["base"]), tokenizer, tokenizer.stop_ids(), max_batch=8,
                    max_context=128)
    reference = load_model(serve_models["base"])
    for name, path in paths.items():
        engine.adapters.attach(name, engine.adapters.read(path), str(path))
        attach_adapter(reference, path, name)
    prompts = ["What is 12 + 7?", "hello world", "Reverse the word: apple", "sort: d c b a", "a b c"]
    jobs = [(tokenizer.encode(p), adapter, 12) for p in prompts for adapter in ("qv", "mlp", None, "all")]
    collectors = [Collector() for _ in jobs]
    for (ids, adapter, max_tokens), collector in zip(jobs, collectors):
        engine.submit(EngineRequest(ids, SamplingParams(max_tokens=max_tokens), collector, adapter=adapter))
    run_until_done(engine, collectors)
    for (ids, adapter, max_tokens), collector in zip(jobs, collectors):
        assert "".join(collector.text) == alone(reference, tokenizer, ids, adapter, max_tokens), adapter


@pytest.mark.parametrize("kernel", [None, False], ids=["kernel-where-it-runs", "dense"])
def test_adapter_stacks_cover_the_batch_then_shrink(serve_models, kernel):
    """A stack holding more adapters than the batch uses (kept across a prefill/decode alternation)
    must still add only each row's own delta, and shrinks once the extra adapters stay unused.
    Both paths: lora_bgmv (where qwenlab's native kernels build) and the dense masked product."""
    from qwenlab.adapters import active_adapters, attach_adapter
    from qwenlab.model import load_model
    from qwenlab import native
    from qwenlab.serve.adapters_bridge import SHRINK_AFTER, AdapterSet

    model, reference = load_model(serve_models["base"]), load_model(serve_models["base"])
    adapters = AdapterSet(model, kernel=kernel)
    for name in ADAPTERS:
        adapters.attach(name, adapters.read(serve_models[name]), str(serve_models[name]))
        attach_adapter(reference, serve_models[name], name)
    assert adapters.use_kernel == (kernel is None and native.available())
    tokens = torch.tensor([[5, 9, 2, 7], [3, 3, 8, 1], [4, 6, 6, 2]])

    def expected(rows):
        out = []
        for i, name in enumerate(rows):
            with active_adapters(reference, name):
                out.append(reference(tokens[i:i + 1]))
        return torch.cat(out)

    with torch.inference_mode():
        adapters.select(list(ADAPTERS))
        assert set(adapters._present) == set(ADAPTERS)
        for rows in (["math", None, "math"], [None, "style", None], ["reverse", "math", None]):
            adapters.select(rows)
            assert set(adapters._present) == set(ADAPTERS)  # covered: no re-stacking
            torch.testing.assert_close(model(tokens), expected(rows), atol=1e-5, rtol=0)
        for step in range(SHRINK_AFTER + 1):
            adapters.select(["math", None, None] if step % 2 else [None, "math", None])
        assert adapters._present == ("math",)
        torch.testing.assert_close(model(tokens), expected([None, "math", None]), atol=1e-5, rtol=0)
        adapters.select(["style", "math", None])  # a newcomer grows the stack again
        assert set(adapters._present) == {"math", "style"}
        torch.testing.assert_close(model(tokens), expected(["style", "math", None]), atol=1e-5, rtol=0)


def test_a_long_prefill_goes_in_chunks_between_the_running_rows_steps(engine, reference):
    """A newcomer's 200-token prompt in 32-token chunks: the stream already running gets a token at every
    step in between (it is not stalled for the whole prefill), and both texts equal their runs alone."""
    tokenizer = engine.tokenizer
    engine.prefill_chunk_tokens = 32
    try:
        running_ids, long_ids = tokenizer.encode("hello world"), (tokenizer.encode("Reverse the word: apple ") * 40)[:200]
        running, newcomer = Collector(), Collector()
        engine.submit(EngineRequest(running_ids, SamplingParams(max_tokens=40, ignore_eos=True), running))
        engine.step()
        engine.step()
        engine.submit(EngineRequest(long_ids, SamplingParams(max_tokens=5, ignore_eos=True), newcomer))
        tokens_before = len(running.text)
        steps = 0
        while not newcomer.text:
            engine.step()
            steps += 1
        assert steps == 200 // 32 + 1  # one chunk per step
        assert len(running.text) - tokens_before >= steps - 1  # the running row decoded at every one of them
        run_until_done(engine, [running, newcomer])
    finally:
        engine.prefill_chunk_tokens = 256
    assert "".join(running.text) == alone(reference.base, tokenizer, running_ids, None, 40)
    assert "".join(newcomer.text) == alone(reference.base, tokenizer, long_ids, None, 5)


def test_requests_that_arrive_together_get_first_tokens_in_arrival_order(engine, reference):
    """Three 100-token prompts at once, with 256-token chunks: a prefill groups requests only while the group
    fits one chunk, so the first two answer after one step and the third a step later (one group of three
    made all three wait two steps). Each text equals its run alone."""
    tokenizer = engine.tokenizer
    prompts = [(tokenizer.encode(f"Reverse the word: {word} ") * 40)[:100] for word in ("apple", "pear", "kiwi")]
    collectors = [Collector() for _ in prompts]
    for ids, collector in zip(prompts, collectors):
        engine.submit(EngineRequest(ids, SamplingParams(max_tokens=4, ignore_eos=True), collector))
    answered = []
    for _ in range(2):
        engine.step()
        answered.append([bool(c.text) for c in collectors])
    assert answered == [[True, True, False], [True, True, True]]
    run_until_done(engine, collectors)
    for ids, collector in zip(prompts, collectors):
        assert "".join(collector.text) == alone(reference.base, tokenizer, ids, None, 4)


def test_a_mixed_length_batch_runs_on_the_native_decode_stack(serve_models, reference):
    """Two requests with prompts of different lengths admitted at once are left-padded in the batch cache:
    each row's padding is leading, so every decode step (both rows, then the one left after the shorter
    request ends) runs in the one-call native decode stack with per-row starts, and each greedy text
    equals the request generated alone."""
    from qwenlab import native
    from qwenlab.checkpoint import open_checkpoint
    from qwenlab.quant import load_quantized_model

    model = load_quantized_model(open_checkpoint(serve_models["int8"], validate=False))
    if model.decode_stack is None:
        assert not native.available()  # only where qwenlab's kernels cannot build
        return
    tokenizer = reference.tokenizer
    engine = Engine("base-int8", model, tokenizer, tokenizer.stop_ids(), max_batch=3, max_context=256)
    stack, taken = model.decode_stack, []
    # each call: (rows, starts, whether it ran); run_decode_stack passes starts as the 7th argument
    model.decode_stack = CountedCalls(stack, lambda args, out: taken.append(
        (args[0].shape[0], None if args[6] is None else args[6].tolist(), out is not None)))
    jobs = [(tokenizer.encode("Reverse the word: apple apple apple"), 9), (tokenizer.encode("hello"), 5)]
    assert len(jobs[0][0]) != len(jobs[1][0])
    collectors = [Collector() for _ in jobs]
    for (ids, max_tokens), collector in zip(jobs, collectors):
        engine.submit(EngineRequest(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True), collector))
    run_until_done(engine, collectors)
    for (ids, max_tokens), collector in zip(jobs, collectors):
        assert "".join(collector.text) == alone(reference.int8, tokenizer, ids, None, max_tokens)
    # every decode step went to the stack and ran there: the mixed steps with two different starts
    assert taken and all(ran for _, _, ran in taken), taken
    mixed = [starts for rows, starts, _ in taken if rows == 2]
    assert len(mixed) == 4 and all(starts is not None and len(set(starts)) == 2 for starts in mixed), taken
    assert engine.cache.native_decode_table[0] is stack  # built for the server's cache

    # A longer newcomer joins a running row mid-stream: the older row moves right (leading padding), so
    # the steps after the join stay on the stack too, and both texts are still their runs alone.
    taken.clear()
    running_ids, long_ids = tokenizer.encode("hello"), tokenizer.encode("Reverse the word: apple apple apple pear")
    running, newcomer = Collector(), Collector()
    engine.submit(EngineRequest(running_ids, SamplingParams(max_tokens=12, ignore_eos=True), running))
    for _ in range(3):
        engine.step()
    assert engine.cache.length < len(long_ids)  # the newcomer is longer than the batch
    engine.submit(EngineRequest(long_ids, SamplingParams(max_tokens=6, ignore_eos=True), newcomer))
    run_until_done(engine, [running, newcomer])
    assert "".join(running.text) == alone(reference.int8, tokenizer, running_ids, None, 12)
    assert "".join(newcomer.text) == alone(reference.int8, tokenizer, long_ids, None, 6)
    assert taken and all(ran for _, _, ran in taken), taken
    assert sum(rows == 2 for rows, _, _ in taken) >= 5, taken  # the steps after the join took the stack
