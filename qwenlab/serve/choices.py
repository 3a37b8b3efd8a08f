"""The HTTP side of one choice: its text, tool calls and logprobs as they arrive, in OpenAI's wire shapes.

A streamed choice and a whole one go through the same ChoiceState (and so the same tool-call parser),
so a stream joins up to exactly what the non-streamed answer holds.
"""

from __future__ import annotations

from qwenlab.serve.requests import EngineEvent
from qwenlab.serve.row_sampling import TokenLogprob
from qwenlab.serve.tool_calls import ToolCallParser, collect_items


def token_logprob_json(entry: TokenLogprob) -> dict:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": entry.bytes,
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, lp, b in entry.top]}


def completion_logprobs_json(entries: list[TokenLogprob], text_start: int = 0) -> dict:
    """The legacy /v1/completions shape: parallel lists, each top list a {token: logprob} dict."""
    offsets, at = [], text_start
    for entry in entries:
        offsets.append(at)
        at += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t: lp for t, lp, _ in e.top} for e in entries], "text_offset": offsets}


class ChoiceState:
    def __init__(self, index: int, tool_names: set[str] | None, stream: bool = True, forced_name: str | None = None):
        """stream False: the answer is parsed whole at the end (a call's JSON is checked before it is taken).
        forced_name: the one function a grammar forces the answer to call (announced with the first token)."""
        self.index, self.stream = index, stream
        self.held: list[str] = []
        self.parser = ToolCallParser(tool_names, forced_name) if tool_names else None
        self.items: list[tuple[str, object]] = []  # ("content", text) / ("tool", call delta), in order
        self.logprobs: list[TokenLogprob] = []
        self.finish: EngineEvent | None = None
        self.text_length = 0  # characters sent (completions' text_offset)

    def add(self, event: EngineEvent) -> list[tuple[str, object]]:
        """A delta or finish event -> the new items it makes (content text and tool-call deltas)."""
        if event.logprobs:
            self.logprobs.extend(event.logprobs)
        if self.parser is not None and not self.stream:
            self.held.append(event.text)
            if event.kind != "finish":
                return []
            new = self.parser.feed("".join(self.held)) + self.parser.finish()
            self.finish = event
        elif event.kind == "finish":
            self.finish = event
            new = self.parser.finish() if self.parser is not None else []
        elif self.parser is not None:
            new = self.parser.feed(event.text)
        else:
            new = [("content", event.text)] if event.text else []
        self.items.extend(new)
        return new

    @property
    def finish_reason(self) -> str | None:
        if self.finish is None:
            return None
        reason = self.finish.finish_reason
        has_calls = any(kind == "tool" for kind, _ in self.items)
        return "tool_calls" if has_calls and reason == "stop" else reason

    def message(self) -> dict:
        answer = collect_items(self.items)
        message = {"role": "assistant", "content": answer.content}
        if answer.tool_calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for c in answer.tool_calls]
        return message

    def text(self) -> str:
        return "".join(item for kind, item in self.items if kind == "content")


def chat_delta(items: list[tuple[str, object]]) -> list[dict]:
    """Items -> chat deltas: runs of content become one delta, each tool-call item its own."""
    deltas, content = [], []
    for kind, item in items:
        if kind == "content":
            content.append(item)
            continue
        if content:
            deltas.append({"content": "".join(content)})
            content = []
        function = {"arguments": item["arguments"]}
        call = {"index": item["index"], "function": function}
        if "id" in item:  # the first chunk of a call: its id, type and name, sent once
            call.update(id=item["id"], type="function")
            function["name"] = item["name"]
        deltas.append({"tool_calls": [call]})
    if content:
        deltas.append({"content": "".join(content)})
    return deltas
