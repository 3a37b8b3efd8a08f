"""The FastAPI app: OpenAI routes, adapter load/unload, /health, /metrics and the playground at `/`."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwenlab.serve.completions import ClientGone, LoopMailbox, prepare, respond
from qwenlab.serve.engine import EngineLoop
from qwenlab.serve.limits import (APIError, BodySizeLimit, ConcurrencyGate, HostCheck, ServeLimits,
                                  allowed_host_names, check_api_key)
from qwenlab.serve.metrics import ServeMetrics
from qwenlab.serve.registry import ModelRegistry, allowed_adapter_folder
from qwenlab.serve.schemas import (ChatCompletionRequest, CompletionRequest, LoadAdapterRequest, ModelList,
                                   NonFiniteValue, UnloadAdapterRequest, error_body)

log = logging.getLogger("qwenlab.serve")
PLAYGROUND = Path(__file__).parent / "playground" / "index.html"


def create_app(registry: ModelRegistry, limits: ServeLimits, metrics: ServeMetrics,
               bind_host: str = "127.0.0.1") -> FastAPI:
    """The ASGI app. The engine thread starts and stops with the app's lifespan.

    bind_host: where it will listen; on a loopback address the Host header is checked."""
    gate = ConcurrencyGate(limits.max_concurrency, on_change=metrics.in_flight.set)

    @asynccontextmanager
    async def lifespan(app):
        app.state.mailbox = LoopMailbox(asyncio.get_running_loop())
        for engine in registry.engines:
            engine.step_listeners.append(app.state.mailbox.wake)
        engine_loop = EngineLoop(registry.engines)
        engine_loop.start()
        try:
            yield
        finally:
            engine_loop.stop()

    app = FastAPI(title="qwenlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry, app.state.limits, app.state.metrics, app.state.gate = registry, limits, metrics, gate
    _install_error_handlers(app, metrics)
    app.include_router(_openai_router(registry, limits, metrics, gate))
    _add_plain_routes(app, registry, metrics)
    # Outermost: a too-large body is refused before anything reads or parses it.
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes, on_reject=metrics.observe_error)
    allowed_hosts = allowed_host_names(bind_host)
    if allowed_hosts is not None:  # added last, so outermost: a rebinding page gets nothing, not even a 413
        app.add_middleware(HostCheck, allowed=allowed_hosts, on_reject=metrics.observe_error)
    return app


def _openai_router(registry: ModelRegistry, limits: ServeLimits, metrics: ServeMetrics,
                   gate: ConcurrencyGate) -> APIRouter:
    def require_api_key(request: Request) -> None:
        check_api_key(request, limits.api_key)

    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
    adapter_root = limits.adapter_root()  # resolved once: the directory's own symlinks are the operator's

    async def generate(body, http_request: Request, endpoint: str):
        target = registry.resolve(body.model)
        # off the event loop: rendering, tokenizing and compiling a grammar take milliseconds
        prepared = await run_in_threadpool(prepare, body, target, limits)
        gate.acquire()
        metrics.observe_request(target.model_id, endpoint, len(prepared.prompt_ids))
        released = False

        def release() -> None:  # once, whichever path ends the request
            nonlocal released
            if not released:
                released = True
                gate.release()

        try:
            return await respond(prepared, body, http_request, limits, release)
        except ClientGone:
            return Response(status_code=499)  # nobody is listening; logged like nginx does
        except BaseException:
            release()
            raise

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http_request: Request):
        return await generate(body, http_request, "chat")

    @router.post("/completions")
    async def completions(body: CompletionRequest, http_request: Request):
        return await generate(body, http_request, "completions")

    @router.get("/models")
    async def models():
        return ModelList(data=registry.cards()).model_dump()

    @router.get("/models/{model_id:path}")
    async def model_card(model_id: str):
        registry.resolve(model_id)
        return next(c for c in registry.cards() if c.id == model_id).model_dump()

    # vLLM's run-time LoRA endpoints, so the same client scripts work against both.
    @router.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapterRequest):
        folder = allowed_adapter_folder(adapter_root, body.lora_path)
        await registry.load_adapter(body.lora_name, folder, body.lora_path, limits.max_adapters)
        return {"object": "adapter", "id": body.lora_name, "status": "loaded"}

    @router.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapterRequest):
        await registry.unload_adapter(body.lora_name)
        return {"object": "adapter", "id": body.lora_name, "status": "unloaded"}

    return router


def _add_plain_routes(app: FastAPI, registry: ModelRegistry, metrics: ServeMetrics) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", "models": sorted(registry.ids()),
                "queued": sum(e.queue_depth() for e in registry.engines),
                "running": sum(len(e.rows) for e in registry.engines)}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))


def _install_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    def reply(status: int, body: dict) -> JSONResponse:
        metrics.observe_error(status)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        return reply(error.status, error.body())

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        cause = (first.get("ctx") or {}).get("error")
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        text = first.get("msg", "invalid value").removeprefix("Value error, ")
        if isinstance(cause, NonFiniteValue):  # found by the whole-body check: name the field it is in
            param, text = cause.param, "must be a finite number (NaN and infinity are refused)"
        elif param is None and ": " in text:  # a check across fields says which field it is about
            param, _, text = text.partition(": ")
        message = f"{param}: {text}" if param else text
        return reply(400, error_body(message, "invalid_request_error", "invalid_value", param))

    @app.exception_handler(Exception)
    async def unexpected(_request, error: Exception):
        log.exception("unhandled error", exc_info=error)
        return reply(500, error_body("Internal server error.", "server_error"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, error: StarletteHTTPException):
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return reply(error.status_code, error_body(str(error.detail), kind))
