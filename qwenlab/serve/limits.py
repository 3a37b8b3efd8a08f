"""Limits and safety: OpenAI-style errors, body size, API key, concurrency.

Every refusal is an OpenAI error body, {"error": {"message", "type", "param", "code"}}, so the
official client raises its usual exception (BadRequestError, AuthenticationError, ...).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from fastapi import Request

from qwenlab.serve.schemas import error_body

DRAIN_LIMIT_BYTES = 4 << 20  # past this, a too-large chunked body is cut off mid-upload
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
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
        payload = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
