"""The HTTP app: middleware, the one error mapping, and the open and admin routes.

Errors of every package carry ``status``, ``type`` and ``code``; `error_response`
is the one place that turns them (and FastAPI's own) into OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.metrics import Metrics

log = logging.getLogger(__name__)

_KNOWN_ROUTES = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/feedback",
    "/v1/feedback/batch",
    "/healthz",
    "/readyz",
    "/metrics",
    "/admin/status",
    "/admin/versions",
    "/admin/rollback",
    "/admin/promotions",
    "/admin/cycles",
}
# Routes with a path parameter, labelled by their template (one series per route, not per id).
_TEMPLATED_ROUTES = (
    (re.compile(r"/admin/versions/[^/]+/promote"), "/admin/versions/{version}/promote"),
    (re.compile(r"/admin/versions/[^/]+/reject"), "/admin/versions/{version}/reject"),
    (re.compile(r"/admin/cycles/[^/]+"), "/admin/cycles/{cycle_id}"),
    (re.compile(r"/reports(/.*)?"), "/reports"),
)


def route_label(path: str) -> str:
    """The metrics label of a request path: the route it matches, or ``other``."""
    if path in _KNOWN_ROUTES:
        return path
    for pattern, template in _TEMPLATED_ROUTES:
        if pattern.fullmatch(path):
            return template
    return "other"


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def error_response(exc: Exception) -> Response:
    status = getattr(exc, "status", 500)
    type_ = getattr(exc, "type", "server_error")
    code = getattr(exc, "code", None)
    headers = getattr(exc, "headers", None) or {}
    if status >= 500:
        log.error("%s: %s", type(exc).__name__, exc)
    return Response(
        error_body(str(exc), type_, code, getattr(exc, "param", None)),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


class BodyTooLarge(Exception):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413, by Content-Length or while reading."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(send)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(f"the body is over {self.limit} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = error_body(
            f"the body is over {self.limit} bytes", "invalid_request_error", "request_too_large"
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Count and time every request by route and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(scope["path"])
        status = 500
        t0 = time.perf_counter()

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


def build_app(
    *,
    lifespan: Any,
    metrics: Metrics,
    max_body_bytes: int,
    ready: Callable[[], Awaitable[tuple[bool, str]]],
) -> FastAPI:
    """The bare app with the open routes; the daemon includes the other routers."""
    app = FastAPI(
        title="adaptd",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )

    async def handle_known(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    async def handle_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
        return Response(
            error_body(str(first.get("msg")), "invalid_request_error", "invalid_request"),
            status_code=422,
            media_type="application/json",
        )

    async def handle_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return Response(
            error_body(str(exc.detail), "invalid_request_error", code),
            status_code=exc.status_code,
            media_type="application/json",
            headers=exc.headers,
        )

    async def handle_disconnect(request: Request, exc: Exception) -> Response:
        # The client left (or was cut off as too slow) while its body was read: nobody reads
        # this answer; 499 is nginx's "client closed request", for the metrics.
        log.debug("client gone while %s %s was read", request.method, request.url.path)
        return Response(status_code=499)

    async def handle_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return Response(
            error_body("internal error; see the daemon's log", "server_error", "internal_error"),
            status_code=500,
            media_type="application/json",
        )

    app.add_exception_handler(RequestValidationError, handle_validation)
    app.add_exception_handler(StarletteHTTPException, handle_http)
    app.add_exception_handler(ClientDisconnect, handle_disconnect)
    app.state.handle_known = handle_known
    app.add_exception_handler(Exception, handle_unexpected)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> Response:
        return Response(orjson.dumps({"status": "ok"}), media_type="application/json")

    @app.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        ok, why = await ready()
        body = {"ready": ok, "detail": why}
        return Response(
            orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json"
        )

    @app.get("/metrics", tags=["health"])
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def register_errors(app: FastAPI, *error_types: type[Exception]) -> None:
    for et in error_types:
        app.add_exception_handler(et, app.state.handle_known)
