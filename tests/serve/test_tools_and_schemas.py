"""Tool calls and structured output through the official `openai` client against a live server:
tool round trips (auto, required, named; streamed and not), json_schema answers that validate on 20
seeds at temperature 1 (nano and a tiny random model, which can only produce JSON when decoding is
constrained), malformed calls coming back as content, and one batch mixing a constrained row, a
tool-call row and a free row over two adapters, each equal to its run alone."""

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import jsonschema
import openai
import pytest

from tests.serve.conftest import LiveServer, get_text, metric

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0,
                                                                              "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                         "ok": {"type": "boolean"}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_models(tmp_path_factory):
    """A tiny random base that speaks nano's tokenizer with a context long enough for the tools block, its
    embedding padded to 416 rows over the 400 tokens (as Qwen2.5 pads 151,665 to 151,936), and two adapters."""
    import shutil

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwenlab.checkpoint.reader import NANO_DIR
    from tests.adapters.conftest import make_peft_adapter

    root = tmp_path_factory.mktemp("tools")
    torch.manual_seed(11)
    config = Qwen2Config(vocab_size=416, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=397, eos_token_id=399)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(root / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(NANO_DIR / name, root / "base" / name)
    for seed, name in enumerate(("math", "reverse")):
        make_peft_adapter(root / "base", root / name, r=4, alpha=8, seed=seed + 1)
    return root


@pytest.fixture(scope="module")
def server(tool_models):
    """The random base with its two adapters, and nano."""
    from qwenlab.serve import ServeConfig, build_app

    config = ServeConfig(base=str(tool_models / "base"), served_model_name="base", max_batch=8,
                         adapters={"math": str(tool_models / "math"), "reverse": str(tool_models / "reverse")},
                         variants={"nano": "nano"})
    with LiveServer(build_app(config)) as live:
        yield live


def engine_of(server, model):
    return server.registry.resolve(model).engine


@contextmanager
def scripted(engine, prompt_ids: list[int], text: str):
    """Make the model write `text` then end its turn, whatever it would have written: a forward hook adds a
    large logit to the scripted token at each position after `prompt_ids` (the server, its parser and its
    stream are what is tested; the model only has to say something malformed on cue)."""
    with scripted_ids(engine, prompt_ids, engine.tokenizer.encode(text)):
        yield


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("max_tokens", [1, 3, 12])
def test_a_forced_call_of_one_function_is_announced_with_the_first_token(server, stream, max_tokens):
    """Named tool_choice, or `required` with one tool: the grammar fixes the function, so its header chunk
    (id, name) goes out with the first token instead of after the model has spelled the name; a call cut
    short by max_tokens is still that call (arguments as far as written), streamed or not."""
    client = server.client()
    named = {"type": "function", "function": {"name": "get_time"}}
    for tools, choice in (([WEATHER, TIME], named), ([TIME], "required")):
        ask = dict(model="base", messages=ASK, tools=tools, tool_choice=choice, max_tokens=max_tokens, temperature=0)
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **ask))
            first = next(c for c in chunks if c.choices and (c.choices[0].delta.content or c.choices[0].delta.tool_calls))
            header = first.choices[0].delta.tool_calls[0]
            assert header.function.name == "get_time" and header.id.startswith("call_")
        content, calls, finish = (streamed if stream else whole)(client, **ask)
        complete = whole(client, **{**ask, "max_tokens": 100})
        assert complete[2] == "tool_calls" and json.loads(complete[1][0]["arguments"])["zone"] in ("UTC", "CET")
        assert content is None and [c["name"] for c in calls] == ["get_time"] and finish == "length"
        assert complete[1][0]["arguments"].startswith(calls[0]["arguments"])  # as far as it was written


@contextmanager
def scripted_ids(engine, prompt_ids: list[int], script: list[int]):
    """`scripted` with the token ids given, then the end of the turn."""
    script = script + [engine.tokenizer.token_id("<|im_end|>")]
    start = len(prompt_ids)

    def hook(_module, _args, kwargs, output):
        step = kwargs["positions"][:, -1] - start + 1
        for row in range(output.shape[0]):
            if 0 <= int(step[row]) < len(script):
                output[row, -1, script[int(step[row])]] += 1e4
        return output

    handle = engine.model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def prompt_ids(engine, messages, tools=None) -> list[int]:
    """The prompt the server should build: the model's own template, arguments decoded once."""
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages, tools=tools))


def streamed(client, **kw):
    """A streamed chat completion accumulated as a client would: (content, tool_calls, finish_reason),
    checking that each call's id and name come once, in its first chunk."""
    content, calls, finish = [], {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            for call in choice.delta.tool_calls or []:
                if call.index not in calls:
                    assert call.id and call.function.name and call.type == "function"
                    calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
                else:
                    assert call.id is None and call.function.name is None
                calls[call.index]["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return "".join(content) or None, [calls[i] for i in sorted(calls)], finish


def whole(client, **kw):
    response = client.chat.completions.create(**kw)
    choice = response.choices[0]
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
             for c in choice.message.tool_calls or []]
    return choice.message.content, calls, choice.finish_reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("choice", ["auto", "required", "named"])
def test_tool_round_trip(server, choice, stream):
    """Call, tool result, final answer: the call is parsed into tool_calls, its arguments match the
    function's schema, and the second turn renders the call and the result through the template."""
    client, engine = server.client(), engine_of(server, "base")
    tool_choice = {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else choice
    ask = dict(model="base", messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=200,
               temperature=0)
    get = streamed if stream else whole
    if choice == "auto":  # a random model does not call tools by itself: it is made to write a call, as Qwen2.5 would
        call_text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
        with scripted(engine, prompt_ids(engine, ASK, [WEATHER, TIME]), call_text):
            content, calls, finish = get(client, **ask)
            other_way = whole(client, **ask) if stream else streamed(client, **ask)
        assert content == "Let me look."
    else:
        content, calls, finish = get(client, **ask)
        other_way = whole(client, **ask) if stream else streamed(client, **ask)
        assert content is None
    assert finish == "tool_calls" and len(calls) == 1 and calls[0]["id"].startswith("call_")
    offered = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    assert calls[0]["name"] == "get_weather" if choice != "required" else calls[0]["name"] in offered
    arguments = json.loads(calls[0]["arguments"])
    jsonschema.validate(arguments, offered[calls[0]["name"]])
    assert (other_way[0], other_way[1][0]["arguments"], other_way[2]) == (content, calls[0]["arguments"], finish)

    history = ASK + [{"role": "assistant", "content": content, "tool_calls": [
        {"id": calls[0]["id"], "type": "function",
         "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"temperature_c": 21}'}]
    final = client.chat.completions.create(model="base", messages=history, tools=[WEATHER, TIME], max_tokens=12,
                                           temperature=0)
    rendered = engine.tokenizer.apply_chat_template(
        ASK + [{"role": "assistant", "content": content or "", "tool_calls": [
            {"type": "function", "function": {"name": calls[0]["name"], "arguments": arguments}}]},
            {"role": "tool", "content": '{"temperature_c": 21}'}], tools=[WEATHER, TIME])
    assert "<tool_response>\n{\"temperature_c\": 21}\n</tool_response>" in rendered
    assert f'"arguments": {json.dumps(arguments)}' in rendered  # decoded once, not a JSON string inside JSON
    assert final.usage.prompt_tokens == len(engine.tokenizer.encode(rendered))
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.tool_calls is None


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("text, reason", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', "bad JSON"),
    ('<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>', "unknown function"),
    ('<tool_call>\n{"name": "get_weather", "arguments": "Paris"}\n</tool_call>', "arguments not an object"),
    ('Sure <tool_call', "a tag cut off"),
])
def test_malformed_tool_call_text_comes_back_as_content(server, text, reason, stream):
    client, engine = server.client(), engine_of(server, "base")
    ask = dict(model="base", messages=ASK, tools=[WEATHER], max_tokens=200, temperature=0)
    with scripted(engine, prompt_ids(engine, ASK, [WEATHER]), text):
        content, calls, finish = (streamed if stream else whole)(server.client(), **ask)
    if stream and reason == "bad JSON":
        # a stream commits to a call once its name is read (as vLLM's does): the arguments come as written
        assert calls and calls[0]["arguments"] == '{"city": }' and content is None
    else:
        assert (content, calls, finish) == (text, [], "stop"), reason


@pytest.mark.parametrize("model", ["nano", "base"])
def test_json_schema_answers_validate_on_20_seeds(server, model):
    """At temperature 1: the random base cannot write JSON unless decoding is constrained."""
    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(20):
        response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Describe "
                                                                          "someone."}],
                                                  response_format=fmt, temperature=1, seed=seed, max_tokens=120)
        choice = response.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    plain = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Describe someone."}],
                                           temperature=1, seed=0, max_tokens=40).choices[0].message.content
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain)  # unconstrained, the same model does not


def test_json_object_and_streamed_schema(server):
    client = server.client()
    response = client.chat.completions.create(model="base", messages=ASK, response_format={"type": "json_object"},
                                              temperature=0, max_tokens=200)
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(response.choices[0].message.content), dict)
    else:  # cut at max_tokens: still an object's beginning
        assert response.choices[0].message.content.startswith("{")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    content, _, finish = streamed(client, model="base", messages=ASK, response_format=fmt, temperature=1, seed=3,
                                  max_tokens=120)
    assert finish == "stop"
    jsonschema.validate(json.loads(content), PERSON)


@pytest.mark.parametrize("schema, feature", [({"not": {"type": "string"}}, "not"),
                                             ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
                                             ({"type": "string", "format": "no-such-format"}, "no-such-format")])
def test_unsupported_schema_feature_is_a_400_naming_it(server, schema, feature):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as error:
        server.client().chat.completions.create(model="base", messages=ASK, response_format=fmt, max_tokens=5)
    assert feature in error.value.body["message"]
    assert error.value.body["param"] == "response_format.json_schema.schema"
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    with pytest.raises(openai.BadRequestError) as error:
        server.client().chat.completions.create(model="base", messages=ASK, tools=[bad_tool], tool_choice="required",
                                                max_tokens=5)
    assert feature in error.value.body["message"] and error.value.body["param"] == "tools"


def test_a_mixed_batch_equals_each_row_alone(server):
    """A constrained row, a forced tool-call row and a free row over two adapters and the base, in one
    batch: each row's greedy answer equals its answer alone."""
    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    named = {"type": "function", "function": {"name": "get_time"}}
    jobs = [dict(model="math", messages=ASK, response_format=fmt),
            dict(model="reverse", messages=ASK, tools=[WEATHER, TIME], tool_choice=named),
            dict(model="base", messages=ASK),
            dict(model="reverse", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                 parallel_tool_calls=False),
            dict(model="math", messages=[{"role": "user", "content": "hello world"}])]

    def run(job, stream=False):
        return (streamed if stream else whole)(client, temperature=0, max_tokens=150, **job)

    alone = [run(job) for job in jobs]
    before = get_text(server.url + "/metrics")
    with ThreadPoolExecutor(len(jobs) * 2) as pool:
        together = list(pool.map(lambda i: run(jobs[i % len(jobs)], stream=i >= len(jobs)), range(2 * len(jobs))))
    after = get_text(server.url + "/metrics")
    tokens = sum(metric(after, "qwenlab_generated_tokens_total", model=m) -
                 metric(before, "qwenlab_generated_tokens_total", model=m) for m in ("base", "math", "reverse"))
    steps = (metric(after, "qwenlab_decode_step_seconds_count", engine="base")
             - metric(before, "qwenlab_decode_step_seconds_count", engine="base"))
    assert steps < tokens / 2, (steps, tokens)  # the rows shared decode steps: they ran as one batch
    strip = lambda result: (result[0], [(c["name"], c["arguments"]) for c in result[1]], result[2])
    assert [strip(r) for r in together] == [strip(r) for r in alone + alone]
    jsonschema.validate(json.loads(alone[0][0]), PERSON)
    assert alone[1][1][0]["name"] == "get_time" and alone[1][2] == "tool_calls"
    assert json.loads(alone[1][1][0]["arguments"])["zone"] in ("UTC", "CET")
    assert len(alone[3][1]) == 1


def test_tool_choice_none_is_accepted_and_leaves_the_tools_out(server):
    client, engine = server.client(), engine_of(server, "base")
    response = client.chat.completions.create(model="base", messages=ASK, tools=[WEATHER], tool_choice="none",
                                              max_tokens=4, temperature=0)
    assert response.usage.prompt_tokens == len(prompt_ids(engine, ASK))  # no tools block: nothing to call
    assert response.choices[0].message.tool_calls is None


@pytest.fixture(scope="module")
def tag_token_server(tool_models, tmp_path_factory):
    """The random base with a tokenizer that has `<tool_call>` and `</tool_call>` as tokens of their own (ids
    400 and 401 of the padded embedding), not special, as Qwen2.5's tokenizer.json has them."""
    import shutil

    from qwenlab.serve import ServeConfig, build_app

    folder = tmp_path_factory.mktemp("tags") / "base"
    shutil.copytree(tool_models / "base", folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    for token_id, content in ((400, "<tool_call>"), (401, "</tool_call>")):
        tokenizer["added_tokens"].append({"id": token_id, "content": content, "single_word": False, "lstrip": False,
                                          "rstrip": False, "normalized": False, "special": False})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with LiveServer(build_app(ServeConfig(base=str(folder), served_model_name="base", max_batch=4))) as live:
        yield live


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("spelled", [False, True], ids=["tag-tokens", "tag-text"])
def test_a_forced_call_takes_the_tag_tokens_qwen_writes(tag_token_server, stream, spelled):
    """Qwen2.5 writes `<tool_call>` as one token. A forced call's grammar must accept it (llguidance's mask
    offered only that token for the tag written as text, and its matcher then refused it: every forced call
    failed); the tag spelled out in ordinary tokens stays allowed too."""
    engine = engine_of(tag_token_server, "base")
    tokenizer = engine.tokenizer
    assert tokenizer.encode("<tool_call>") == [400] and tokenizer.encode("</tool_call>") == [401]
    call = '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}'
    ask = dict(model="base", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=100, temperature=0)
    prompt = prompt_ids(engine, ASK, [WEATHER])
    if spelled:  # the tags in ordinary tokens: script them id by id, past the tokenizer's merging
        ids = [t for part in ("<tool_call", ">") for t in tokenizer.encode(part)]
        assert 400 not in ids
        text_ids = ids + tokenizer.encode("\n" + call + "\n") + [t for part in ("</tool_call", ">")
                                                                  for t in tokenizer.encode(part)]
    else:
        text_ids = tokenizer.encode("<tool_call>\n" + call + "\n</tool_call>")
        assert text_ids[0] == 400 and text_ids[-1] == 401
    with scripted_ids(engine, prompt, text_ids):
        content, calls, finish = (streamed if stream else whole)(tag_token_server.client(), **ask)
    assert finish == "tool_calls" and content is None
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Oslo", "days": 3})]
