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
from qwenlab.serve.requests import EngineEvent, EngineRequest, SamplingParams
from qwenlab.serve.schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                                   ChatCompletionRequest, Completion, CompletionChoice, Delta,
                                   SamplingFields, error_body, new_id, usage)

POLL_S = 0.5  # how often a waiting handler checks for a vanished client (and sends an SSE keep-alive)


class ClientGone(Exception):
    pass


@dataclass
class Prepared:
    target: Target
    prompt_ids: list[int]
    params: SamplingParams


def prepare(body: SamplingFields, target: Target, limits: ServeLimits) -> Prepared:
    unsupported = body.unsupported_field()
    if unsupported:
        raise APIError(400, f"'{unsupported}' is not supported by this server.", code="unsupported_parameter",
                       param=unsupported)
    tokenizer = target.engine.tokenizer
    try:
        if isinstance(body, ChatCompletionRequest):
            messages = [{**(m.model_extra or {}), "role": m.role, "content": m.text()} for m in body.messages]
            prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
        else:
            prompt = body.prompt_text_or_ids()
            prompt_ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt)
    except (QwenlabError, ValueError) as e:
        raise APIError(400, str(e), param="messages" if isinstance(body, ChatCompletionRequest) else "prompt") from None
    if not prompt_ids:
        raise APIError(400, "The prompt is empty: at least one token is needed.", param="prompt")
    if max(prompt_ids) >= target.engine.model.config.vocab_size or min(prompt_ids) < 0:
        raise APIError(400, "The prompt holds token ids outside the vocabulary.", param="prompt")
    return Prepared(target, prompt_ids, _sampling(body, len(prompt_ids), target.engine.max_context, limits))


def _sampling(body: SamplingFields, prompt_tokens: int, context: int, limits: ServeLimits) -> SamplingParams:
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
                          stop=tuple(body.stop or ()), seed=body.seed, ignore_eos=body.ignore_eos)


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

    def __init__(self, prepared: Prepared, timeout_s: float, mailbox: LoopMailbox):
        self.queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self.deadline = mailbox.loop.time() + timeout_s
        self.mailbox = mailbox
        self.request = EngineRequest(prepared.prompt_ids, prepared.params, adapter=prepared.target.adapter,
                                     model_id=prepared.target.model_id, on_event=self._deliver)
        self.engine = prepared.target.engine
        self.held: EngineEvent | None = None

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
        """Engine events until finish/error; None every POLL_S while waiting. Raises TimeoutError."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = self.deadline - loop.time()
            if remaining <= 0:
                self.cancel()
                raise TimeoutError
            event, self.held = self.held, None
            if event is None:
                try:
                    event = await asyncio.wait_for(self.queue.get(), timeout=min(POLL_S, remaining))
                except asyncio.TimeoutError:
                    yield None
                    continue
            event = self._merge_waiting_deltas(event)
            yield event
            if event.kind != "delta":
                return

    def _merge_waiting_deltas(self, event: EngineEvent) -> EngineEvent:
        """A slow reader gets the deltas that piled up as one chunk (fewer writes when loaded)."""
        while event.kind == "delta" and not self.queue.empty():
            following = self.queue.get_nowait()
            if following.kind != "delta":
                self.held = following
                break
            event = EngineEvent("delta", event.text + following.text)
        return event


async def collect(generation: Generation, http_request: Request) -> tuple[str, EngineEvent]:
    """Run to the end; the text and the finish event. A vanished client cancels the generation."""
    parts: list[str] = []
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
                raise APIError(500, event.text)
            if event.kind == "finish":
                return "".join(parts), event
            parts.append(event.text)
    except TimeoutError:
        raise APIError(504, "The generation ran past the server's request timeout.", code="timeout") from None
    raise APIError(500, "the generation ended without a finish event")


_PLACEHOLDER = "qwenlab-text-goes-here"


def _sse(payload) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


async def stream_events(generation: Generation, chat: bool, model: str, include_usage: bool,
                        on_close) -> AsyncIterator[str]:
    """SSE chunks as OpenAI sends them, then `data: [DONE]`. Closing the stream cancels the generation."""
    response_id = new_id("chatcmpl" if chat else "cmpl")

    def chunk(text: str | None, finish: str | None = None, role: str | None = None):
        if chat:
            choice = ChatChunkChoice(delta=Delta(role=role, content=text), finish_reason=finish)
            return ChatCompletionChunk(id=response_id, model=model, choices=[choice], created=created)
        choice = CompletionChoice(text=text or "", finish_reason=finish)
        return Completion(id=response_id, model=model, choices=[choice], created=created)

    # Text chunks are the per-token hot path: render the model once, then splice each text in
    # (a pydantic build + dump per token cost the HTTP thread, and so the engine, GIL time).
    created = int(time.time())
    prefix, _, suffix = chunk(_PLACEHOLDER).model_dump_json().partition(json.dumps(_PLACEHOLDER))

    try:
        if chat:
            yield _sse(chunk("", role="assistant"))
        async for event in generation.events():
            if event is None:
                yield ": keep-alive\n\n"  # a write that fails tells us the client has gone
            elif event.kind == "delta":
                yield f"data: {prefix}{json.dumps(event.text, ensure_ascii=False)}{suffix}\n\n"
            elif event.kind == "finish":
                yield _sse(chunk(None if chat else "", finish=event.finish_reason))
                if include_usage:
                    final = chunk("")
                    final.choices, final.usage = [], usage(event.prompt_tokens, event.completion_tokens)
                    yield _sse(final)
            else:
                yield _sse(error_body(event.text, "server_error"))
    except TimeoutError:
        yield _sse(error_body("The generation ran past the server's request timeout.", "timeout", "timeout"))
    finally:
        generation.cancel()  # no-op when finished; frees the batch row when the client went away
        on_close()
    yield "data: [DONE]\n\n"


async def respond(prepared: Prepared, body: SamplingFields, http_request: Request, limits: ServeLimits,
                  release) -> JSONResponse | StreamingResponse:
    """Submit and answer; `release` is called exactly once when the request is over."""
    chat = isinstance(body, ChatCompletionRequest)
    model = prepared.target.model_id
    generation = Generation(prepared, limits.request_timeout_s, http_request.app.state.mailbox)
    generation.start()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # release() runs when the stream ends; the background task covers a stream never started.
        return StreamingResponse(stream_events(generation, chat, model, include_usage, release),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(release))
    try:
        text, finish = await collect(generation, http_request)
    finally:
        release()
    counts = usage(finish.prompt_tokens, finish.completion_tokens)
    if chat:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish.finish_reason)
        return JSONResponse(ChatCompletion(id=new_id("chatcmpl"), model=model, choices=[choice],
                                           usage=counts).model_dump())
    choice = CompletionChoice(text=text, finish_reason=finish.finish_reason)
    return JSONResponse(Completion(id=new_id("cmpl"), model=model, choices=[choice], usage=counts).model_dump())
