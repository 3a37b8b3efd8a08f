"""Limits and safety: OpenAI-style errors, body size, API key, concurrency, the Host header check.

Every refusal is an OpenAI error body, {"error": {"message", "type", "param", "code"}}, so the
official client raises its usual exception (BadRequestError, AuthenticationError, ...).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from qwenlab.errors import QwenlabError
from qwenlab.serve.schemas import error_body

DRAIN_LIMIT_BYTES = 4 << 20  # past this, a too-large chunked body is cut off mid-upload
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
               404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               421: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error", 504: "timeout"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return error_body(self.message, ERROR_TYPES.get(self.status, "invalid_request_error"), self.code, self.param)


@dataclass
class ServeLimits:
    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096  # the most a request may ask for
    default_max_tokens: int = 1024  # when a chat request does not say (OpenAI's default is "up to the context")
    max_concurrency: int = 64  # requests accepted at once (running + queued); more get a 429
    request_timeout_s: float = 600.0  # a generation running longer is cancelled (504)
    api_key: str | None = None
    allow_adapter_dir: str | None = None  # /v1/load_lora_adapter reads folders under it only; None: off
    max_adapters: int = 16  # adapters attached at once (start-up ones included)

    def check(self) -> None:
        """Refuse nonsense at start, naming the flag: one line, before any model is loaded."""
        at_least("--max-body-size", self.max_body_bytes, 1)
        at_least("--max-tokens", self.max_tokens, 1)
        at_least("--default-max-tokens", self.default_max_tokens, 1)
        at_least("--max-concurrency", self.max_concurrency, 1)
        at_least("--max-adapters", self.max_adapters, 1)
        timeout = self.request_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise QwenlabError(f"--request-timeout must be a positive number of seconds, got {timeout!r}")
        if self.allow_adapter_dir is not None and not Path(self.allow_adapter_dir).is_dir():
            raise QwenlabError(f"--allow-adapter-dir: '{self.allow_adapter_dir}' is not a directory")

    def adapter_root(self) -> Path | None:
        """--allow-adapter-dir with its symlinks resolved (what load requests are checked against)."""
        return Path(self.allow_adapter_dir).resolve() if self.allow_adapter_dir is not None else None


def at_least(flag: str, value, low: int, high: int | None = None) -> None:
    """An integer flag within [low, high]; else a one-line QwenlabError naming it."""
    wanted = f"an integer from {low} to {high}" if high is not None else f"an integer of at least {low}"
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise QwenlabError(f"{flag} must be {wanted}, got {value!r}")


# ---- API key ------------------------------------------------------------------------------------
def check_api_key(request: Request, api_key: str | None) -> None:
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # compare_digest: the time taken does not reveal how much of the key matched
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")


# ---- Host header (DNS rebinding) -------------------------------------------------------------------
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_host_names(bind_host: str) -> frozenset[str] | None:
    """The Host names a server bound to `bind_host` answers; None: any (a non-loopback bind, where the
    names clients use cannot be known - the API key is the guard there)."""
    if not is_loopback(bind_host):
        return None
    return LOOPBACK_NAMES | {bind_host.strip("[]").lower()}


def host_name(header: str) -> str:
    """'Example.com:8000' -> 'example.com', '[::1]:8000' -> '::1' (the port does not matter)."""
    value = header.strip().lower()
    if value.startswith("["):
        name = value[1:value.find("]")] if "]" in value else value
    else:
        name, colon, port = value.rpartition(":")
        if not colon or not port.isdigit():
            name = value
    return name.rstrip(".")


class HostCheck:
    """Refuse requests whose Host header is not this machine (421), on a loopback bind.

    Against DNS rebinding: a web page from evil.example whose DNS name is switched to 127.0.0.1 can
    make the browser send requests to this server, as same-origin, and read the answers; the browser
    still sends `Host: evil.example`, which no client of a loopback server legitimately does.
    """

    def __init__(self, app, allowed: frozenset[str], on_reject=None):
        self.app, self.allowed, self.on_reject = app, allowed, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if host_name(header) in self.allowed:
            return await self.app(scope, receive, send)
        if self.on_reject is not None:
            self.on_reject(421)
        await send_error(send, APIError(421, f"Host header '{header[:100]}' is not this server; a loopback server "
                                        "answers only localhost, 127.0.0.1 and [::1].", code="invalid_host"))


async def send_error(send, error: APIError, close: bool = False) -> None:
    """An OpenAI-shaped error response from plain ASGI middleware (before FastAPI's handlers exist)."""
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# ---- concurrency ----------------------------------------------------------------------------------
class ConcurrencyGate:
    """Counts requests in flight; past the limit a request is refused at once (429), not queued forever.

    Used from the event loop thread only, so a plain counter is enough.
    """

    def __init__(self, limit: int, on_change=None):
        self.limit, self.in_flight, self.on_change = limit, 0, on_change

    def acquire(self) -> None:
        if self.in_flight >= self.limit:
            raise APIError(429, f"Too many requests in flight (limit {self.limit}); retry shortly.",
                           code="rate_limit_exceeded")
        self.in_flight += 1
        self._changed()

    def release(self) -> None:
        self.in_flight -= 1
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.in_flight)


# ---- body size (pure ASGI: it runs before FastAPI reads and parses anything) -------------------------
class BodySizeLimit:
    """Refuse bodies over `max_bytes` with a 413, by Content-Length or by counting a chunked body.

    The body is read here (it is small by construction) and replayed to the app; later `receive`
    calls go to the server, so disconnect detection still works.
    """

    def __init__(self, app, max_bytes: int, on_reject=None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_bytes:
                await self._drain(receive, message.get("more_body", False))
                return await self._reject(send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _drain(self, receive, more: bool) -> None:
        """Read (and drop) the rest of a chunked body, up to a bound, so the client can read our 413."""
        drained = 0
        while more and drained < DRAIN_LIMIT_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)

    async def _reject(self, send) -> None:
        if self.on_reject is not None:
            self.on_reject(413)
        error = APIError(413, f"Request body too large (limit {self.max_bytes} bytes).", code="request_too_large")
        await send_error(send, error, close=True)
