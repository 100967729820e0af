"""The FastAPI application: routes, API-key check, body limit, metrics, lifecycle.

``create_app`` takes a running ``ServingEngine`` (an ``AsyncEngine``, or a
``DataParallelEngine`` of replica processes) and serves it; it never touches the ``Engine``
itself, so the engine underneath can change without the server changing.
"""
from __future__ import annotations

import contextlib
import secrets
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..async_engine import ServingEngine
from .chat import ChatCompletions
from .completions import Completions
from .errors import AnswerUnhandledErrors, APIError, error_response, install_error_handlers
from .metrics import ServerMetrics
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       DetokenizeResponse, ModelCard, ModelList, TokenizeRequest,
                       TokenizeResponse)
from .serving import Serving
from .tokenization import Tokenization
from .reasoning import reasoning_parser as reasoning_parser_named
from .tool_calls import ToolCallConfig

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
          "/health", "/metrics")


class _CountRequests:
    """Counts HTTP responses by route and status (a plain ASGI middleware, so streaming
    responses and disconnect detection pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class _LimitBody:
    """Answers bodies over ``max_bytes`` with an OpenAI-style 413: at once when Content-Length
    says so, or as soon as a chunked body grows past the limit. (Starlette's own limiter sends
    a plain-text 413, which is not what OpenAI clients parse.)"""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def error(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of "
                             f"{self.max_bytes} bytes; send a shorter prompt (or start the server "
                             "with a larger --max-body-bytes)", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await error_response(self.error())(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self.error()
            return message

        await self.app(scope, limited_receive, send)


def create_app(engine: ServingEngine, model_name: str, *, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               drain_timeout: float = 30.0, tool_call_parser: str | None = None,
               exclude_tools_when_tool_choice_none: bool = False,
               reasoning_parser: str | None = None) -> FastAPI:
    """An OpenAI-compatible app serving ``engine`` as ``model_name``.

    api_key: when set, /v1/*, /tokenize and /detokenize need ``Authorization: Bearer <api_key>``
    (/health and /metrics stay open for probes and scrapers). max_body_bytes: larger request bodies get a 413.
    drain_timeout: on shutdown, how long requests still in flight may run before being aborted.
    tool_call_parser: how to find tool calls in the output ('hermes', 'llama3_json'); None:
    requests with tool_choice "auto" get a 400. exclude_tools_when_tool_choice_none: do not
    render the tools into the prompt of a request with tool_choice "none". reasoning_parser:
    'qwen3' or 'deepseek_r1' moves the model's <think> text into ``reasoning_content``.
    """
    tool_config = ToolCallConfig(tool_call_parser, exclude_tools_when_tool_choice_none)
    metrics = ServerMetrics(engine, model_name)
    serving = Serving(engine, model_name, metrics)
    completions = Completions(serving)
    chat = ChatCompletions(serving, tool_config, reasoning_parser_named(reasoning_parser))
    tokenization = Tokenization(serving, chat)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.shutdown(drain_timeout)

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                     api_key.encode()):
            raise APIError(401, "incorrect API key: send the key the server was started with "
                                "(--api-key) as 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    app = FastAPI(title="duetjax", summary="OpenAI-compatible LLM server", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.max_body_bytes = max_body_bytes
    install_error_handlers(app)
    app.add_middleware(AnswerUnhandledErrors)  # (the last added runs first: this one last)
    app.add_middleware(_LimitBody, max_bytes=max_body_bytes)
    app.add_middleware(_CountRequests, metrics=metrics)
    v1 = [Depends(check_api_key)]

    def card() -> ModelCard:
        return ModelCard(id=model_name, root=str(engine.model_path),
                         max_model_len=engine.max_model_len)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine takes requests; 503 while draining or after an engine failure
        (with the reason)."""
        if not engine.is_healthy:
            return JSONResponse({"status": "engine failed", "reason": engine.failure},
                                status_code=503)
        if engine.is_draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=v1)
    async def list_models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", dependencies=v1)
    async def get_model(model_id: str) -> ModelCard:
        serving.check_model(model_id)
        return card()

    @app.post("/v1/completions", dependencies=v1, response_model=None)
    async def create_completion(body: CompletionRequest, request: Request):
        return await completions.create(body, request)

    @app.post("/v1/chat/completions", dependencies=v1, response_model=None)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        return await chat.create(body, request)

    @app.post("/tokenize", dependencies=v1)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await tokenization.tokenize(body)

    @app.post("/detokenize", dependencies=v1)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await tokenization.detokenize(body)

    return app
