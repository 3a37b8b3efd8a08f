"""From an OpenAI request body to engine events and back: prompt, limits, SSE stream or one JSON body."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from qwenlab.errors import QwenlabError
from qwenlab.serve.limits import APIError, ServeLimits
from qwenlab.serve.registry import Target
from qwenlab.serve.choices import ChoiceState, chat_delta, completion_logprobs_json, token_logprob_json
from qwenlab.serve.constrained import json_schema_grammar, tool_call_grammar
from qwenlab.serve.requests import EngineEvent, EngineRequest, SamplingParams
from qwenlab.serve.schemas import (ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, Completion,
                                   CompletionChoice, Delta, NamedToolChoice, SamplingFields, error_body, new_id,
                                   usage)
from qwenlab.serve.tool_calls import template_messages

POLL_S = 0.5  # how often a waiting handler checks for a vanished client (and sends an SSE keep-alive)


class ClientGone(Exception):
    pass


@dataclass
class Prepared:
    target: Target
    prompt_ids: list[int]
    params: SamplingParams
    constraint: object | None = None  # a compiled grammar every choice follows
    tool_names: set[str] | None = None  # parse the answer for calls of these functions
    forced_name: str | None = None  # the one function a grammar forces every choice to call


def prepare(body: SamplingFields, target: Target, limits: ServeLimits) -> Prepared:
    """Check the request and turn it into engine input; every refusal is a 400 naming its field."""
    refused = body.unsupported_field()
    if refused:
        name, why = refused
        raise APIError(400, f"'{name}' {why}.", code="unsupported_parameter", param=name)
    engine = target.engine
    tokenizer = engine.tokenizer
    chat = isinstance(body, ChatCompletionRequest)
    calling = chat and bool(body.tools) and body.tool_choice != "none"
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if calling else None
    try:
        if chat:
            prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(template_messages(body.messages), tools=tools))
        else:
            prompt = body.prompt_text_or_ids()
            prompt_ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt)
    except (QwenlabError, ValueError) as e:
        raise APIError(400, str(e), param="messages" if chat else "prompt") from None
    if not prompt_ids:
        raise APIError(400, "The prompt is empty: at least one token is needed.", param="prompt")
    vocab = engine.model.config.vocab_size
    if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
        raise APIError(400, "The prompt holds token ids outside the vocabulary.", param="prompt")
    bias = tuple((int(k), v) for k, v in (body.logit_bias or {}).items())
    if any(not 0 <= token < vocab for token, _ in bias):
        raise APIError(400, f"logit_bias: token ids must be in [0, {vocab})", param="logit_bias")
    if body.n > engine.max_batch:  # each choice is a batch row: more could never be admitted
        raise APIError(400, f"n: this server runs at most {engine.max_batch} rows at once (--max-batch)", param="n")
    params = _sampling(body, len(prompt_ids), engine.max_context, limits, bias)
    constraint = _constraint(body, engine) if chat else None
    tool_names = {t["function"]["name"] for t in tools} if calling else None
    return Prepared(target, prompt_ids, params, constraint, tool_names, _forced_name(body) if chat else None)


def _forced_name(body: ChatCompletionRequest) -> str | None:
    """The function a forced call must be, when only one can be: a named tool_choice, or `required` with one
    tool offered."""
    if isinstance(body.tool_choice, NamedToolChoice):
        return body.tool_choice.function.name
    if body.tool_choice == "required" and body.tools and len(body.tools) == 1:
        return body.tools[0].function.name
    return None


def _constraint(body: ChatCompletionRequest, engine):
    """The grammar a chat request's choices must follow: a forced tool call or a JSON answer (or None)."""
    forced = body.tool_choice == "required" or isinstance(body.tool_choice, NamedToolChoice)
    fmt = body.response_format
    if forced and fmt is not None and fmt.type != "text":
        raise APIError(400, "response_format: cannot be combined with a tool_choice that forces a call",
                       param="response_format")
    if forced:
        names = ([body.tool_choice.function.name] if isinstance(body.tool_choice, NamedToolChoice)
                 else [t.function.name for t in body.tools])
        functions = [t.function.model_dump(exclude_none=True) for t in body.tools]
        single = isinstance(body.tool_choice, NamedToolChoice) or not body.parallel_tool_calls
        grammar = tool_call_grammar(functions, names, parallel=not single, tag_ids=engine.grammars.tool_tag_ids)
        return engine.grammars.compile(grammar, "tools")
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return engine.grammars.compile(json_schema_grammar({"type": "object"}), "response_format")
    return engine.grammars.compile(json_schema_grammar(fmt.json_schema.schema_), "response_format.json_schema.schema")


def _sampling(body: SamplingFields, prompt_tokens: int, context: int, limits: ServeLimits,
              bias: tuple) -> SamplingParams:
    asked = body.requested_max_tokens()
    room = context - prompt_tokens
    if asked is not None and asked > limits.max_tokens:
        raise APIError(400, f"max_tokens is {asked}; this server allows at most {limits.max_tokens}.",
                       param="max_tokens", code="max_tokens_too_large")
    if room < 1 or (asked is not None and asked > room):
        raise APIError(400, f"This model's context window is {context} tokens; the prompt has {prompt_tokens} and "
                       f"{asked or 1} more were asked for.", param="messages", code="context_length_exceeded")
    default = limits.default_max_tokens if isinstance(body, ChatCompletionRequest) else 16  # OpenAI's defaults
    return SamplingParams(max_tokens=asked or min(default, room, limits.max_tokens), temperature=body.temperature,
                          top_p=body.top_p, top_k=max(0, body.top_k), repetition_penalty=body.repetition_penalty,
                          stop=tuple(body.stop or ()), seed=body.seed, ignore_eos=body.ignore_eos, n=body.n,
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          logit_bias=bias, logprobs=body.top_logprob_count())


class LoopMailbox:
    """Engine thread -> event loop, for every request at once. Events are queued during a step and
    the loop is woken once, by `wake()` at the step's end: waking it mid-step (once per row per
    token) made the engine and the HTTP thread fight over the GIL.

    No lock, for the same reason: deque appends and pops are atomic, `wake` reads `scheduled` after
    the appends and `_flush` clears it before it drains, so no event is left without a flush to come.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: deque[tuple[asyncio.Queue, EngineEvent]] = deque()
        self.scheduled = False

    def post(self, queue: asyncio.Queue, event: EngineEvent) -> None:
        self.pending.append((queue, event))

    def wake(self) -> None:
        if self.pending and not self.scheduled:
            self.scheduled = True
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self.scheduled = False
        while self.pending:
            queue, event = self.pending.popleft()
            queue.put_nowait(event)


class Generation:
    """One engine request seen from the event loop: its events arrive on an asyncio queue."""

    def __init__(self, prepared: Prepared, timeout_s: float, mailbox: LoopMailbox, stream: bool):
        self.queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self.deadline = mailbox.loop.time() + timeout_s
        self.mailbox = mailbox
        self.request = EngineRequest(prepared.prompt_ids, prepared.params, adapter=prepared.target.adapter,
                                     model_id=prepared.target.model_id, on_event=self._deliver,
                                     constraint=prepared.constraint)
        self.choices = [ChoiceState(i, prepared.tool_names, stream, prepared.forced_name)
                        for i in range(prepared.params.n)]
        self.engine = prepared.target.engine
        self.held: EngineEvent | None = None
        self.started: set[int] = set()  # choices whose first delta went out

    def _deliver(self, event: EngineEvent) -> None:
        """Called on the engine thread."""
        try:
            self.mailbox.post(self.queue, event)
        except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
            self.request.cancel()

    def start(self) -> None:
        self.engine.submit(self.request)

    def cancel(self) -> None:
        self.request.cancel()

    async def events(self) -> AsyncIterator[EngineEvent | None]:
        """Engine events until every choice has finished, or an error; None every POLL_S while waiting.
        Raises TimeoutError."""
        finished = 0
        loop = asyncio.get_running_loop()
        while True:
            remaining = self.deadline - loop.time()
            if remaining <= 0:
                self.cancel()
                raise TimeoutError
            event, self.held = self.held, None
            if event is None and not self.queue.empty():
                event = self.queue.get_nowait()
            if event is None:
                try:  # asyncio.timeout, not wait_for: wait_for wrapped every get in a new Task (~10% of the
                    # event loop's time per streamed token)
                    async with asyncio.timeout(min(POLL_S, remaining)):
                        event = await self.queue.get()
                except TimeoutError:
                    yield None
                    continue
            event = self._merge_waiting_deltas(event)
            yield event
            finished += event.kind == "finish"
            if event.kind == "error" or finished == len(self.choices):
                return

    def _merge_waiting_deltas(self, event: EngineEvent) -> EngineEvent:
        """A slow reader gets the deltas that piled up as one chunk (fewer writes when loaded); a choice's
        first delta always goes alone, so the client sees its first token when it exists."""
        if event.kind == "delta" and event.index not in self.started:
            self.started.add(event.index)
            return event
        while event.kind == "delta" and not self.queue.empty():
            following = self.queue.get_nowait()
            if following.kind != "delta" or following.index != event.index:
                self.held = following
                break
            logprobs = (event.logprobs or []) + (following.logprobs or []) or None
            event = EngineEvent("delta", event.text + following.text, index=event.index, logprobs=logprobs)
        return event


async def collect(generation: Generation, http_request: Request) -> list[ChoiceState]:
    """Run to the end; every choice, finished. A vanished client cancels the generation."""
    last_check = time.monotonic()
    try:
        async for event in generation.events():
            if time.monotonic() - last_check > POLL_S:
                last_check = time.monotonic()
                if await http_request.is_disconnected():
                    generation.cancel()
                    raise ClientGone
            if event is None:
                continue
            if event.kind == "error":
                generation.cancel()  # the request's other choices stop too
                raise APIError(500, event.text)
            generation.choices[event.index].add(event)
    except TimeoutError:
        raise APIError(504, "The generation ran past the server's request timeout.", code="timeout") from None
    if any(choice.finish is None for choice in generation.choices):
        raise APIError(500, "the generation ended without a finish event")
    return generation.choices


_PLACEHOLDER = "qwenlab-text-goes-here"


def _sse(payload) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


class _Chunks:
    """SSE chunk bodies for one response: a spliced template for plain text (the per-token hot path: a
    pydantic build and dump per token cost the HTTP thread, and so the engine, GIL time), dicts otherwise."""

    def __init__(self, chat: bool, model: str, logprobs: bool):
        self.chat, self.model, self.logprobs = chat, model, logprobs
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        prefix, _, suffix = self.plain_chunk(_PLACEHOLDER).model_dump_json().partition(json.dumps(_PLACEHOLDER))
        self.prefix, self.suffix = prefix, suffix

    def plain_chunk(self, text: str | None, finish: str | None = None, role: str | None = None, index: int = 0):
        if self.chat:
            choice = ChatChunkChoice(index=index, delta=Delta(role=role, content=text), finish_reason=finish)
            return ChatCompletionChunk(id=self.id, model=self.model, choices=[choice], created=self.created)
        choice = CompletionChoice(index=index, text=text or "", finish_reason=finish)
        return Completion(id=self.id, model=self.model, choices=[choice], created=self.created)

    def text(self, text: str) -> str:
        return f"data: {self.prefix}{json.dumps(text, ensure_ascii=False)}{self.suffix}\n\n"

    def choice(self, index: int, delta: dict | None = None, text: str = "", logprobs: dict | None = None,
               finish: str | None = None) -> str:
        """One choice's chunk; `logprobs` already in this endpoint's shape."""
        if self.chat:
            choice = {"index": index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _event_chunks(chunks: _Chunks, choice: ChoiceState, event: EngineEvent) -> list[str]:
    """The SSE chunks one engine event makes for its choice."""
    start = choice.text_length
    items = choice.add(event)
    text = "".join(item for kind, item in items if kind == "content")
    choice.text_length += len(text)
    entries = event.logprobs if chunks.logprobs else None
    if event.kind == "delta" and choice.index == 0 and choice.parser is None and not entries and text:
        return [chunks.text(text)]
    out = []
    if chunks.chat:
        logprobs = {"content": [token_logprob_json(e) for e in entries]} if entries else None
        deltas = chat_delta(items) or ([{}] if logprobs else [])
        for i, delta in enumerate(deltas):
            out.append(chunks.choice(choice.index, delta, logprobs=logprobs if i == 0 else None))
    elif text or entries:
        logprobs = completion_logprobs_json(entries, start) if entries else None
        out.append(chunks.choice(choice.index, text=text, logprobs=logprobs))
    if event.kind == "finish":
        out.append(chunks.choice(choice.index, finish=choice.finish_reason))
    return out


async def stream_events(generation: Generation, chat: bool, model: str, include_usage: bool, logprobs: bool,
                        on_close) -> AsyncIterator[str]:
    """SSE chunks as OpenAI sends them, then `data: [DONE]`; with n > 1 each choice under its own index.
    Closing the stream cancels the generation."""
    chunks = _Chunks(chat, model, logprobs)
    prompt_tokens = completion_tokens = 0
    try:
        if chat:
            for choice in generation.choices:
                yield _sse(chunks.plain_chunk("", role="assistant", index=choice.index))
        async for event in generation.events():
            if event is None:
                yield ": keep-alive\n\n"  # a write that fails tells us the client has gone
            elif event.kind in ("delta", "finish"):
                if event.kind == "finish":
                    prompt_tokens, completion_tokens = event.prompt_tokens, completion_tokens + event.completion_tokens
                for chunk in _event_chunks(chunks, generation.choices[event.index], event):
                    yield chunk
            else:
                yield _sse(error_body(event.text, "server_error"))
        if include_usage and all(c.finish is not None for c in generation.choices):
            final = chunks.plain_chunk("")
            final.choices, final.usage = [], usage(prompt_tokens, completion_tokens)
            yield _sse(final)
    except TimeoutError:
        yield _sse(error_body("The generation ran past the server's request timeout.", "timeout", "timeout"))
    finally:
        generation.cancel()  # no-op when finished; frees the batch rows when the client went away
        on_close()
    yield "data: [DONE]\n\n"


async def respond(prepared: Prepared, body: SamplingFields, http_request: Request, limits: ServeLimits,
                  release) -> JSONResponse | StreamingResponse:
    """Submit and answer; `release` is called exactly once when the request is over."""
    chat = isinstance(body, ChatCompletionRequest)
    model = prepared.target.model_id
    generation = Generation(prepared, limits.request_timeout_s, http_request.app.state.mailbox, body.stream)
    generation.start()
    logprobs = prepared.params.logprobs is not None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # release() runs when the stream ends; the background task covers a stream never started.
        return StreamingResponse(stream_events(generation, chat, model, include_usage, logprobs, release),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(release))
    try:
        choices = await collect(generation, http_request)
    finally:
        release()
    counts = usage(choices[0].finish.prompt_tokens, sum(c.finish.completion_tokens for c in choices))
    if chat:
        body = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": c.index, "message": c.message(), "finish_reason": c.finish_reason,
                             "logprobs": {"content": [token_logprob_json(e) for e in c.logprobs]} if logprobs
                             else None} for c in choices],
                "usage": counts.model_dump()}
        return JSONResponse(body)
    body = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "text": c.text(), "finish_reason": c.finish_reason,
                         "logprobs": completion_logprobs_json(c.logprobs) if logprobs else None} for c in choices],
            "usage": counts.model_dump()}
    return JSONResponse(body)
