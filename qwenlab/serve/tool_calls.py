"""Tool calls in Qwen2.5's own format (Hermes): OpenAI messages into the chat template, and the model's
`<tool_call>{"name": …, "arguments": …}</tool_call>` blocks back out as OpenAI tool calls.

One parser serves both answers: a streamed one feeds it every text delta, a whole one feeds the
whole text at once, so the two can only differ where a stream had to commit before the end (below).

- Tags are matched as text: nano's vocabulary has no <tool_call> token, and Qwen2.5's decodes to the
  same text. A stream holds back a suffix that may begin a tag.
- A call is sent as vLLM's hermes parser and OpenAI send it: `{index, id, type, function.name}` once,
  then only `function.arguments` fragments. The fragments are the model's own text of the arguments
  value, cut where its braces balance, so nothing is auto-closed or lost; they join up to the text
  the whole answer gives.
- A forced call of one known function (a named `tool_choice`, or `required` with one tool) is announced
  with the first token: the grammar guarantees the call, so the client need not wait for the model to
  spell the name out before its first chunk (`forced_name`).
- Text outside the calls is content; whitespace next to a tag is dropped.
- A call that does not parse (bad JSON, arguments not an object, a function not offered) comes back as
  content, tags and all. The one exception: a stream commits to a call once its name is read and
  offered, so JSON that breaks after that point stays a call with the arguments as written.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from qwenlab.serve.limits import APIError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# The start of a call the way the template shows it, up to where the arguments value begins.
HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
ARGUMENTS_KEY = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def template_messages(messages) -> list[dict]:
    """OpenAI chat messages -> the dicts Qwen2.5's template reads.

    An assistant's past calls carry `arguments` as a JSON string; the template writes `arguments|tojson`,
    so it is decoded first (else the model would see a doubly encoded string)."""
    out = []
    for i, message in enumerate(messages):
        rendered = {**(message.model_extra or {}), "role": message.role, "content": message.text()}
        if message.tool_calls:
            calls = []
            for j, call in enumerate(message.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments: not valid JSON",
                                   param=f"messages[{i}].tool_calls[{j}].function.arguments") from None
                calls.append({"type": "function", "function": {"name": call.function.name, "arguments": arguments}})
            rendered["tool_calls"] = calls
        out.append(rendered)
    return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _container_end(text: str, start: int, state: list) -> int | None:
    """Scan text[start:] of a JSON object/array; state = [depth, in_string, escaped] carried between calls.
    Returns the index just past the closing bracket, or None if it has not closed yet."""
    depth, in_string, escaped = state
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                state[:] = [depth, in_string, escaped]
                return i + 1
    state[:] = [depth, in_string, escaped]
    return None


@dataclass
class _Call:
    index: int
    id: str = field(default_factory=new_call_id)
    body: str = ""
    announced: bool = False  # the header chunk was sent (a stream committed to this call)
    args_start: int | None = None
    args_sent: int = 0  # characters of the arguments text sent
    args_end: int | None = None
    scan: list = field(default_factory=lambda: [0, False, False])
    scanned: int = 0


class ToolCallParser:
    """Feed text deltas; get back ("content", text) and ("tool", {index, id?, name?, arguments}) items."""

    def __init__(self, tool_names: set[str], forced_name: str | None = None):
        """forced_name: the function a grammar-forced answer calls; its first call is announced at once."""
        self.tool_names = tool_names
        self.forced_name = forced_name
        self.announced_first: _Call | None = None  # the forced call, announced before its text arrived
        self.buffer = ""  # text not yet classified (outside a call)
        self.call: _Call | None = None
        self.calls = 0
        self.held_space = ""  # trailing whitespace of content: dropped if a tag follows
        self.after_call = False  # drop whitespace right after a closing tag

    def feed(self, text: str) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        if self.forced_name is not None and self.calls == 0 and self.call is None and self.announced_first is None:
            self.announced_first = _Call(0, announced=True)
            out.append(("tool", {"index": 0, "id": self.announced_first.id, "name": self.forced_name,
                                 "arguments": ""}))
        if self.call is not None:
            self.call.body += text
        else:
            self.buffer += text
        while True:
            if self.call is None:
                at = self.buffer.find(OPEN)
                if at < 0:
                    keep = _partial_tag_length(self.buffer)
                    self._content(self.buffer[:len(self.buffer) - keep], out)
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return out
                self._content(self.buffer[:at], out)
                self.held_space, self.after_call = "", False
                self.call = _Call(self.calls) if self.calls or self.announced_first is None else self.announced_first
                self.call.body = self.buffer[at + len(OPEN):]
                self.buffer = ""
            end = self.call.body.find(CLOSE)
            if end < 0:
                self._stream_arguments(out)
                return out
            rest = self.call.body[end + len(CLOSE):]
            self.call.body = self.call.body[:end]
            self._complete(out, closed=True)
            self.buffer = rest

    def finish(self) -> list[tuple[str, object]]:
        """At the end of the text: an unclosed call is taken if it parses; held text is let out."""
        out: list[tuple[str, object]] = []
        if self.call is not None:
            self._complete(out, closed=False)
        elif self.announced_first is not None and self.calls == 0:
            self.buffer = ""  # cut off inside the opening tag: the forced call was announced, with no arguments
        self._content(self.buffer, out)
        self.buffer = ""
        if self.held_space and not self.after_call:
            out.append(("content", self.held_space))
        self.held_space = ""
        return out

    # ---- inside a call -------------------------------------------------------------------------
    def _stream_arguments(self, out: list) -> None:
        call = self.call
        if call.args_start is None:
            match = HEADER.match(call.body)
            if match is None or match.end() == len(call.body) or call.body[match.end()] != "{" \
                    or _unescape(match.group(1)) not in self.tool_names:
                return  # not (yet) a call of an offered function with an object: wait, or for the closing tag
            call.args_start = call.scanned = match.end()
            if not call.announced:
                call.announced = True
                out.append(("tool", {"index": call.index, "id": call.id, "name": _unescape(match.group(1)),
                                     "arguments": ""}))
        if call.args_end is None:
            call.args_end = _container_end(call.body, call.scanned, call.scan)
            call.scanned = len(call.body)
        upto = call.args_end if call.args_end is not None else len(call.body) - _unclosed_tail_length(call.body)
        self._send_arguments(call, call.body[call.args_start + call.args_sent:upto], out)

    def _complete(self, out: list, closed: bool) -> None:
        call, self.call = self.call, None
        parsed = _parse_call(call.body, self.tool_names)
        if parsed is None and not call.announced:
            raw = OPEN + call.body + (CLOSE if closed else "")
            self.after_call = False
            self._content(raw, out)
            return
        if not call.announced:
            out.append(("tool", {"index": call.index, "id": call.id, "name": parsed[0], "arguments": ""}))
            call.announced = True
        if parsed is not None:
            arguments = parsed[1]
        elif call.args_start is None:  # a committed call whose text broke off before its arguments began
            arguments = ""
        else:  # a committed call whose text broke off: its arguments as written
            if call.args_end is None:  # the text after the last scan (it may hold the closing bracket) came
                call.args_end = _container_end(call.body, call.scanned, call.scan)  # with the closing tag
                call.scanned = len(call.body)
            arguments = call.body[call.args_start:call.args_end]
            if call.args_end is None:  # never closed: as written, less what ends the call (held back in a stream)
                arguments = arguments[:len(arguments) - _unclosed_tail_length(arguments)]
        self._send_arguments(call, arguments[call.args_sent:], out)
        self.calls += 1
        self.after_call = True
        self.held_space = ""

    @staticmethod
    def _send_arguments(call: _Call, text: str, out: list) -> None:
        if text:
            call.args_sent += len(text)
            out.append(("tool", {"index": call.index, "arguments": text}))

    # ---- outside a call --------------------------------------------------------------------------
    def _content(self, text: str, out: list) -> None:
        if self.after_call:
            text = text.lstrip()
            if not text:
                return
            self.after_call = False
        text = self.held_space + text
        kept = text.rstrip()
        self.held_space = text[len(kept):]
        if kept:
            out.append(("content", kept))


def _partial_tag_length(text: str, tag: str = OPEN) -> int:
    """How many trailing characters of `text` may be the beginning of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


def _unclosed_tail_length(text: str) -> int:
    """How many trailing characters of an unclosed arguments text may be the whitespace and the beginning of
    CLOSE that end the call rather than belong to its arguments: a stream holds them back."""
    cut = len(text) - _partial_tag_length(text, CLOSE)
    return len(text) - len(text[:cut].rstrip())


def _unescape(name: str) -> str:
    try:
        return json.loads(f'"{name}"')
    except json.JSONDecodeError:
        return name


def _parse_call(body: str, tool_names: set[str]) -> tuple[str, str] | None:
    """(name, arguments text) of a call body, or None when it is not a valid call of an offered function.
    The arguments text is the model's own text of the value (what a stream sent), re-encoded only when
    that cannot be found."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("name") not in tool_names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    match = HEADER.match(body) or ARGUMENTS_KEY.search(body)
    if match is not None:
        try:
            raw, end = json.JSONDecoder().raw_decode(body, match.end())
            if raw == arguments:
                return value["name"], body[match.end():end]
        except json.JSONDecodeError:
            pass
    return value["name"], json.dumps(arguments, ensure_ascii=False)


@dataclass
class ParsedAnswer:
    content: str | None
    tool_calls: list[dict]  # [{id, name, arguments}]


def parse_answer(text: str, tool_names: set[str]) -> ParsedAnswer:
    """A whole answer: its content and calls, exactly what a stream of it would have sent."""
    parser = ToolCallParser(tool_names)
    return collect_items(parser.feed(text) + parser.finish())


def collect_items(items: list[tuple[str, object]]) -> ParsedAnswer:
    content, calls = [], {}
    for kind, item in items:
        if kind == "content":
            content.append(item)
            continue
        call = calls.setdefault(item["index"], {"id": None, "name": None, "arguments": ""})
        call["id"] = item.get("id") or call["id"]
        call["name"] = item.get("name") or call["name"]
        call["arguments"] += item["arguments"]
    return ParsedAnswer("".join(content) or None, [calls[i] for i in sorted(calls)])
