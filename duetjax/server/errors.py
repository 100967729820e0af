"""Every failure as an OpenAI-style error body that says what to fix.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`` with the status the
OpenAI API uses: 400 for bad input, 401 for a wrong key, 404 for an unknown model or route,
413 for an oversized body, 429 (with Retry-After) when the queue is full, 503 while draining.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..async_engine import (EngineDeadError, EngineDrainingError, QueueFullError,
                            RequestAbortedError, RequestFailedError)
from .protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error to send to the client as is."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def error_response(error: APIError) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=error.message, type=error.type,
                                         param=error.param, code=error.code))
    return JSONResponse(body.model_dump(), status_code=error.status, headers=error.headers)


def from_engine_error(error: BaseException) -> APIError:
    """Maps what ``AsyncEngine.add_request`` and its streams raise to an HTTP error."""
    if isinstance(error, QueueFullError):
        seconds = str(max(1, round(error.retry_after)))
        return APIError(429, str(error), type="rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": seconds})
    if isinstance(error, EngineDrainingError):
        return APIError(503, str(error), type="service_unavailable", code="draining",
                        headers={"Retry-After": "5"})
    if isinstance(error, RequestAbortedError):
        return APIError(503, str(error), type="service_unavailable", code="aborted")
    if isinstance(error, EngineDeadError):
        return APIError(500, str(error), type="server_error", code="engine_dead")
    if isinstance(error, RequestFailedError):
        return APIError(500, str(error), type="server_error", code="request_failed")
    if isinstance(error, (ValueError, TypeError)):  # the Engine's checks of prompt and params
        return bad_request(str(error))
    return APIError(500, f"internal error: {error!r}", type="server_error")


UNION_FORMS = {
    "prompt": "a non-empty string, a list of strings, a list of token ids, or a list of "
              "non-empty lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of {'type': 'text', 'text': ...} parts",
}
"""What to say about fields that accept several forms."""


def _location(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts)


def describe_validation_errors(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable sentence (and the offending field) for pydantic's error list."""
    first = errors[0]
    kind = first.get("type", "")
    where = _location(first.get("loc", ()))
    message = str(first.get("msg", "")).removeprefix("Value error, ")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({detail}); send a JSON object", None
    if kind == "invalid_json_value":  # (protocol.check_json_values: the field is in ctx)
        return message, first["ctx"]["field"]
    if not where:
        if kind in ("missing", "model_attributes_type", "dict_type"):
            return "the request body must be a JSON object", None
        return message, None
    if kind == "extra_forbidden":
        return (f"unknown field '{where}'; remove it (see the OpenAI API reference for the "
                "fields this endpoint accepts)", where)
    if kind == "missing":
        return f"'{where}' is required", where
    if len(errors) > 1:
        # A union field (e.g. prompt, content) reports one error per alternative: name the
        # deepest location they share rather than the first alternative's.
        paths = [_location(e.get("loc", ())).split(".") for e in errors]
        shared = []
        for parts in zip(*paths):
            if len(set(parts)) > 1:
                break
            shared.append(parts[0])
        field = ".".join(p for p in shared if not p.startswith(("str", "list", "int"))) or where
        if field != where:
            forms = UNION_FORMS.get(field.split(".")[-1], "see the OpenAI API reference")
            return (f"'{field}' has the wrong type or value (got {first.get('input')!r:.80}); "
                    f"it takes {forms}", field)
    return f"'{where}': {message} (got {first.get('input')!r:.80})", where


def install_error_handlers(app: FastAPI) -> None:
    """Makes every error path answer with an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(error.errors())
        return error_response(bad_request(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if isinstance(error.__cause__, APIError):  # FastAPI wraps errors raised reading the body
            return error_response(error.__cause__)
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /v1/models"
            return error_response(APIError(404, message, code="not_found"))
        if error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
            return error_response(APIError(405, message, code="method_not_allowed"))
        return error_response(APIError(error.status_code, str(error.detail),
                                       headers=getattr(error, "headers", None)))


def internal_error(error: Exception) -> APIError:
    """What an exception no handler took becomes: an engine error as ``from_engine_error``
    maps it, anything else a 500 (a ValueError here is a server bug, not bad input: bad input
    is refused before any work)."""
    if isinstance(error, (ValueError, TypeError)):
        return APIError(500, f"internal error: {error!r}", type="server_error")
    return from_engine_error(error)


class AnswerUnhandledErrors:
    """Answers an exception that no handler took with an OpenAI-style 500 from inside the app.
    (Starlette's own last-resort handler sits outside every middleware: its 500s would go
    uncounted, and it re-raises, so the server then drops the connection.) Installed innermost,
    under the counting middleware."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # part of a response is out: nothing else can be said on it
                raise
            await error_response(internal_error(error))(scope, receive, send)
