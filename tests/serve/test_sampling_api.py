"""The rest of the sampling API through the official `openai` client against a live server: logprobs equal
to log_softmax of the model's logits, n choices from one seed, penalties and logit_bias moving the output
the way they should, max_completion_tokens, and 400s that name the field for what is not served."""

import openai
import pytest
import torch

PROMPT = [{"role": "user", "content": "What is 12 + 7?"}]


@pytest.fixture(scope="module")
def library_model(serve_models):
    from qwenlab.model import load_model, load_tokenizer

    return load_model(serve_models["base"]), load_tokenizer(serve_models["base"])


def token_ids(tokenizer, entries) -> list[int]:
    """The ids of the returned tokens, from their exact bytes (byte-level BPE spells each token uniquely)."""
    by_bytes = {}
    for i in range(tokenizer.vocab_size):
        by_bytes.setdefault(bytes(tokenizer.token_bytes(i)), i)
    return [by_bytes[bytes(e.bytes)] for e in entries]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_logprobs_equal_log_softmax_of_the_models_logits(server, library_model, sampled):
    """Greedy, and sampled at temperature 1 with the padding rows (ids 300-319 of 320, past the 300-token
    vocabulary, which spell nothing) biased away: logprobs are taken after logit_bias, before temperature."""
    model, tokenizer = library_model
    padding = {str(i): -100 for i in range(tokenizer.vocab_size, model.config.vocab_size)}
    sampling = dict(temperature=1.0, seed=4, logit_bias=padding) if sampled else dict(temperature=0)
    response = server.client().chat.completions.create(model="base", messages=PROMPT, max_tokens=10, logprobs=True,
                                                       top_logprobs=3, extra_body={"ignore_eos": True}, **sampling)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens == 10
    prompt = tokenizer.encode(tokenizer.apply_chat_template(PROMPT))
    chosen = token_ids(tokenizer, entries)
    bias = torch.zeros(model.config.vocab_size)
    bias[tokenizer.vocab_size:] = -100 if sampled else 0
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([prompt + chosen]))[0].float() + bias, dim=-1)
    for step, (entry, token) in enumerate(zip(entries, chosen)):
        expected = logprobs[len(prompt) - 1 + step]
        assert entry.logprob == pytest.approx(float(expected[token]), abs=1e-4)
        assert bytes(entry.bytes) == tokenizer.token_bytes(token)
        top_values, top_ids = torch.topk(expected, 3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top_values.tolist(), abs=1e-4)
        assert token_ids(tokenizer, entry.top_logprobs) == top_ids.tolist()
    # The tokens' bytes spell the content (a character may span two tokens, each then shown with U+FFFD alone)
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace") == \
        response.choices[0].message.content


def test_completions_logprobs_in_the_legacy_shape_streamed_and_not(server):
    client = server.client()
    ask = dict(model="base", prompt="hello world", max_tokens=6, temperature=0, logprobs=2,
               extra_body={"ignore_eos": True})
    whole = client.completions.create(**ask).choices[0]
    assert len(whole.logprobs.tokens) == len(whole.logprobs.token_logprobs) == 6
    # (tokens that spell the same text share a key: the legacy shape is a dict)
    assert all(1 <= len(top) <= 2 and all(v <= 0 for v in top.values()) for top in whole.logprobs.top_logprobs)
    assert whole.logprobs.token_logprobs[0] == max(whole.logprobs.top_logprobs[0].values())  # greedy: the top one
    assert whole.logprobs.text_offset[0] == 0 and "".join(whole.logprobs.tokens) == whole.text
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **ask)]
    assert [t for c in chunks if c.logprobs for t in c.logprobs.token_logprobs] == whole.logprobs.token_logprobs
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == whole.logprobs.text_offset


def test_n_choices_with_a_seed_repeat(server):
    client = server.client()
    ask = dict(model="math", messages=PROMPT, n=3, temperature=1.0, seed=7, max_tokens=12)
    first = client.chat.completions.create(**ask)
    second = client.chat.completions.create(**ask)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) > 1  # each choice samples on its own
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **ask):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == first.usage.completion_tokens
    assert streamed == texts
    assert first.usage.prompt_tokens == client.chat.completions.create(
        model="math", messages=PROMPT, max_tokens=1).usage.prompt_tokens  # one prompt, counted once


def generated(client, **kw) -> list[int]:
    """The generated token ids (their first bytes, enough to tell repeats), greedy, to max_tokens."""
    response = client.chat.completions.create(model="base", messages=PROMPT, temperature=0, max_tokens=40,
                                              logprobs=True, extra_body={"ignore_eos": True, **kw.pop("extra", {})},
                                              **kw)
    return [tuple(e.bytes) for e in response.choices[0].logprobs.content]


def test_penalties_move_the_output_the_expected_way(server):
    client = server.client()
    plain = generated(client)
    repeats = lambda tokens: len(tokens) - len(set(tokens))
    assert repeats(plain) > 5  # the random model repeats itself, which the penalties should curb
    assert repeats(generated(client, frequency_penalty=2.0)) < repeats(plain)
    assert repeats(generated(client, presence_penalty=2.0)) < repeats(plain)
    assert repeats(generated(client, frequency_penalty=-2.0)) >= repeats(plain)


def test_logit_bias_and_max_completion_tokens(server, library_model):
    _, tokenizer = library_model
    client = server.client()
    target = tokenizer.encode(" world")[-1]
    response = client.chat.completions.create(model="base", messages=PROMPT, temperature=0, max_completion_tokens=5,
                                              logit_bias={str(target): 100}, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 5
    assert response.choices[0].message.content == tokenizer.decode([target] * 5)
    first = generated(client)[0]
    first_id = next(i for i in range(tokenizer.vocab_size) if tuple(tokenizer.token_bytes(i)) == first)
    assert generated(client, logit_bias={str(first_id): -100})[0] != first


@pytest.mark.parametrize("fields, param, says", [
    ({"frobnicate": 1}, "frobnicate", "not a field this server knows"),
    ({"echo": True}, "echo", "not supported"),
    ({"best_of": 3}, "best_of", "not supported"),
    ({"functions": [{"name": "f"}]}, "functions", "not supported"),
    ({"n": 9}, "n", ""),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", ""),
    ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"logit_bias": {"99999": 5}}, "logit_bias", "token ids"),
    ({"logit_bias": {"5": 500}}, "logit_bias", "[-100, 100]"),
    ({"presence_penalty": 3}, "presence_penalty", ""),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strange": 1}}]}, "tools.0.function.strange", ""),
])
def test_fields_not_served_are_400s_naming_them(server, fields, param, says):
    with pytest.raises(openai.BadRequestError) as error:
        server.client().chat.completions.create(model="base", messages=PROMPT, max_tokens=3, extra_body=fields)
    body = error.value.body
    assert body["param"] == param and says in body["message"], body
    assert "\n" not in body["message"]


def test_bookkeeping_fields_are_accepted_and_ignored(server):
    response = server.client().chat.completions.create(model="base", messages=PROMPT, max_tokens=3, store=False,
                                                       metadata={"k": "v"}, user="u", service_tier="auto")
    assert response.choices[0].finish_reason in ("stop", "length")


def test_frequency_and_presence_penalties_follow_openais_formula():
    from qwenlab.serve.row_sampling import apply_frequency_presence

    logits, counts = torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[0.0, 1.0, 3.0]])
    out = apply_frequency_presence(logits, counts, frequency=0.5, presence=0.25)
    assert out.tolist() == [[1.0, 1.0 - 0.5 - 0.25, 1.0 - 1.5 - 0.25]]
