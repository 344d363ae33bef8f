"""The OpenAI-compatible gateway: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Only these routes reach vLLM; its control endpoints are never proxied. Each
request is checked against the limits, its `model` alias is resolved to what
vLLM serves (the base model or a LoRA adapter), the body is forwarded, and the
answer is passed back (token by token when streaming) with its `id` replaced by
the interaction id. Every exchange is handed to an `ExchangeSink` when it ends;
the sink must not block (the daemon's sink queues it for the SQLite writer).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from serving.engine import UPSTREAM_KEEPALIVE_S

log = logging.getLogger(__name__)


class GatewayError(Exception):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"

    def __init__(
        self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.param = param
        self.headers = headers or {}


class LimitExceeded(GatewayError):
    code = "limit_exceeded"


class ModelNotFound(GatewayError):
    status = 404
    code = "model_not_found"


class NotReady(GatewayError):
    status = 503
    type = "server_error"
    code = "not_ready"


class Caller(Protocol):
    @property
    def label(self) -> str: ...
    @property
    def is_admin(self) -> bool: ...


@dataclass(frozen=True)
class Target:
    """What a `model` alias resolves to."""

    upstream: str  # the name vLLM knows: "base" or an adapter's lora_name
    version: str  # what the `x-adaptd-version` header says: "base" or a version name


class Resolver(Protocol):
    async def __call__(self, model: str, caller: Caller) -> Target: ...


class Upstream(Protocol):
    base_url: str
    ready: bool

    @property
    def headers(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 4096
    max_n: int = 8
    max_prompt_chars: int = 200_000
    max_messages: int = 512


@dataclass
class Exchange:
    """One request and its answer, handed to the sink when it ends."""

    id: str
    endpoint: str  # chat | completion
    model: str
    version: str
    caller: str
    request: Any
    params: dict[str, Any]
    stream: bool
    created_at: float
    output: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    status: str = "ok"  # ok | aborted | error
    upstream_status: int = 200
    extra_outputs: list[str] = field(default_factory=list)


ExchangeSink = Callable[[Exchange], None]

_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
# How often a relay asks whether its client is still there (`Gateway._relay`).
GONE_CHECK_S = 0.05
_CONTENT_KEYS = ("messages", "prompt")


def _check_int(body: dict[str, Any], key: str, lo: int, hi: int) -> None:
    value = body.get(key)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise GatewayError(f"`{key}` must be an integer, got {type(value).__name__}", param=key)
    if value < lo:
        raise GatewayError(f"`{key}` must be at least {lo}, got {value}", param=key)
    if value > hi:
        raise LimitExceeded(f"`{key}` is {value}; this server allows at most {hi}", param=key)


def _prompt_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_prompt_chars(v) for v in value)
    if isinstance(value, dict):
        return sum(_prompt_chars(v) for k, v in value.items() if k in ("content", "text"))
    return 0


def validate(body: Any, endpoint: str, limits: Limits) -> dict[str, Any]:
    """Check a request body against the shape and the limits; return it as a dict."""
    if not isinstance(body, dict):
        raise GatewayError("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError("`model` is required: `adaptd`, `base` or a version name", param="model")
    if endpoint == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise GatewayError("`messages` must be a non-empty list", param="messages")
        if len(msgs) > limits.max_messages:
            raise LimitExceeded(
                f"{len(msgs)} messages; this server allows at most {limits.max_messages}",
                param="messages",
            )
        for n, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise GatewayError(
                    f"`messages[{n}]` must be an object with a `role`", param="messages"
                )
        chars = _prompt_chars(msgs)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str | list) or not prompt:
            raise GatewayError("`prompt` must be a non-empty string or list", param="prompt")
        chars = _prompt_chars(prompt)
    if chars > limits.max_prompt_chars:
        raise LimitExceeded(
            f"the prompt has {chars} characters; this server allows at most {limits.max_prompt_chars}",
            param=_CONTENT_KEYS[endpoint != "chat"],
        )
    for key in _TOKEN_FIELDS:
        _check_int(body, key, 1, limits.max_tokens)
    _check_int(body, "n", 1, limits.max_n)
    _check_int(body, "best_of", 1, limits.max_n)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise GatewayError("`stream` must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise GatewayError("`stream_options` must be an object", param="stream_options")
    return body


_ROLES = ["system", "user", "assistant", "tool", "developer"]
_INT64 = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
_TEXT_PARTS = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    },
}


def openapi_request(endpoint: str, limits: Limits) -> dict[str, Any]:
    """The request body for the OpenAPI document: the route reads the raw body and checks it
    with `validate`; vLLM checks the sampling parameters. Other OpenAI parameters pass through."""
    count = {"type": "integer", "minimum": 1}
    props: dict[str, Any] = {
        "model": {
            "type": "string",
            "minLength": 1,
            "description": "`adaptd`, `base` or a version name (admin key)",
        },
        "max_tokens": {**count, "maximum": limits.max_tokens},
        "max_completion_tokens": {**count, "maximum": limits.max_tokens},
        "n": {**count, "maximum": limits.max_n},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "seed": _INT64,
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    }
    if endpoint == "chat":
        props["messages"] = {
            "type": "array",
            "minItems": 1,
            "maxItems": limits.max_messages,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {"type": "string", "enum": _ROLES},
                    "content": {"anyOf": [{"type": "string"}, {"type": "null"}, _TEXT_PARTS]},
                },
            },
        }
    else:
        props["prompt"] = {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "items": {"type": "string"}},
                {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
            ],
            "description": "text, texts, or token ids",
        }
        props["best_of"] = {**count, "maximum": limits.max_n}
    required = ["model", "messages" if endpoint == "chat" else "prompt"]
    schema = {"type": "object", "required": required, "properties": props}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def openai_error(status: int, payload: bytes) -> dict[str, Any]:
    """vLLM's error answer in OpenAI's shape. vLLM says `"type": "BadRequestError"` (or the
    status phrase) and `"code": 400`, older versions `{"object": "error", "message": ...}`, and
    a crash may answer plain text; OpenAI's `type` is a category and its `code` a string."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        data = payload.decode(errors="replace")[:2000]
    inner = data.get("error", data) if isinstance(data, dict) else data
    if not isinstance(inner, dict):
        inner = {} if inner is None else {"message": str(inner)}
    message = inner.get("message", inner.get("detail"))  # (`detail`: a FastAPI error)
    param, code = inner.get("param"), inner.get("code")
    if not isinstance(message, str) or not message:
        message = f"the model server answered {status}"
    return {
        "error": {
            "message": message,
            "type": "server_error" if status >= 500 else "invalid_request_error",
            "param": param if isinstance(param, str) else None,
            "code": code if isinstance(code, str) else None,
        }
    }


# A 200 is JSON, or server-sent events with `"stream": true`.
OPENAPI_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the answer; with `stream`, server-sent events of chunks, then `[DONE]`",
        "content": {"text/event-stream": {}},
    }
}


def _params(body: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in body.items() if k not in ("model", "messages", "prompt", "stream_options")
    }


def _text_of(choice: dict[str, Any], endpoint: str) -> str:
    if endpoint == "chat":
        msg = choice.get("message") or {}
        return msg.get("content") or ""
    return choice.get("text") or ""


def _delta_of(choice: dict[str, Any], endpoint: str) -> str:
    if endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


class Gateway:
    """Forwards OpenAI requests to vLLM; see the module docstring."""

    def __init__(
        self,
        upstream: Upstream,
        resolve: Resolver,
        sink: ExchangeSink,
        *,
        limits: Limits,
        base_name: str = "base",
        list_models: Callable[[Caller], Awaitable[list[str]]] | None = None,
    ) -> None:
        self.upstream = upstream
        self.resolve = resolve
        self.sink = sink
        self.limits = limits
        self.base_name = base_name
        self.list_models = list_models
        self.inflight: Counter[str] = Counter()  # requests in flight per upstream name
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            json_serialize=lambda o: orjson.dumps(o).decode(),
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- routes ----------------------------------------------------------------
    def router(self, auth: Callable[..., Any]) -> APIRouter:
        router = APIRouter(tags=["inference"])

        @router.post(
            "/v1/chat/completions",
            openapi_extra=openapi_request("chat", self.limits),
            responses=OPENAPI_STREAM,
        )
        async def chat(request: Request, caller: Any = Depends(auth)) -> Response:
            return await self.handle(request, caller, "chat")

        @router.post(
            "/v1/completions",
            openapi_extra=openapi_request("completion", self.limits),
            responses=OPENAPI_STREAM,
        )
        async def completions(request: Request, caller: Any = Depends(auth)) -> Response:
            return await self.handle(request, caller, "completion")

        @router.get("/v1/models")
        async def models(caller: Any = Depends(auth)) -> Response:
            names = await self.list_models(caller) if self.list_models else ["adaptd", "base"]
            now = int(time.time())
            data = [
                {"id": n, "object": "model", "created": now, "owned_by": "adaptd"} for n in names
            ]
            return Response(
                orjson.dumps({"object": "list", "data": data}), media_type="application/json"
            )

        return router

    async def handle(self, request: Request, caller: Caller, endpoint: str) -> Response:
        t0 = time.perf_counter()
        raw = await request.body()
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise GatewayError(f"the body is not valid JSON: {e}") from None
        body = validate(parsed, endpoint, self.limits)
        model = body["model"]
        # Not ready: vLLM is starting, or restarted and its adapters are being settled; the
        # alias may be about to move, so nothing is resolved (or loaded) until it is ready.
        if not self.upstream.ready:
            raise NotReady("the model server is starting or restarting; retry shortly")
        target = await self.resolve(model, caller)
        if not self.upstream.ready:
            raise NotReady("the model server is starting or restarting; retry shortly")
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        iid = f"{prefix}-{uuid.uuid4().hex}"
        headers = {"x-adaptd-interaction-id": iid, "x-adaptd-version": target.version}
        ex = Exchange(
            id=iid,
            endpoint=endpoint,
            model=model,
            version=target.version,
            caller=caller.label,
            request=body.get("messages") if endpoint == "chat" else body.get("prompt"),
            params=_params(body),
            stream=body.get("stream", False),
            created_at=time.time(),
        )
        body["model"] = target.upstream
        # Counted from here until the answer is sent, so a version is unloaded only after
        # the requests that started on it have finished (see `drained`).
        self.inflight[target.upstream] += 1
        streaming = False
        try:
            path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
            if ex.stream:
                wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                body["stream_options"] = {
                    **(body.get("stream_options") or {}),
                    "include_usage": True,
                }
                resp = await self._send(path, body, ex, headers)
                if resp.status != 200:
                    return await self._error_passthrough(resp, ex, headers, t0)
                if await request.is_disconnected():
                    # The client left while vLLM began its answer (a busy machine can take
                    # seconds): drop the upstream connection now, so vLLM stops making it.
                    resp.close()
                    ex.status = "aborted"
                    ex.latency_ms = (time.perf_counter() - t0) * 1000
                    self.sink(ex)
                    return Response(status_code=499)  # nobody reads it ("client closed")
                streaming = True
                return StreamingResponse(
                    self._relay(resp, ex, t0, wants_usage, target.upstream, request),
                    media_type="text/event-stream",
                    headers={**headers, "cache-control": "no-cache"},
                )
            resp = await self._send(path, body, ex, headers)
            if resp.status != 200:
                return await self._error_passthrough(resp, ex, headers, t0)
            try:
                data = orjson.loads(await resp.read())
            except aiohttp.ClientError as e:  # vLLM died in the middle of its answer
                ex.status = "error"
                raise NotReady(f"the model server went away: {e}", headers=headers) from e
            finally:
                resp.release()
        finally:
            if not streaming:
                self._done(target.upstream)
        data["id"] = iid
        data["model"] = model
        choices = data.get("choices") or []
        if choices:
            ex.output = _text_of(choices[0], endpoint)
            ex.finish_reason = choices[0].get("finish_reason")
            ex.extra_outputs = [_text_of(c, endpoint) for c in choices[1:]]
        usage = data.get("usage") or {}
        ex.prompt_tokens = usage.get("prompt_tokens")
        ex.completion_tokens = usage.get("completion_tokens")
        ex.latency_ms = (time.perf_counter() - t0) * 1000
        self.sink(ex)
        return Response(orjson.dumps(data), media_type="application/json", headers=headers)

    def _done(self, upstream: str) -> None:
        self.inflight[upstream] -= 1
        if self.inflight[upstream] <= 0:
            del self.inflight[upstream]

    async def drained(self, upstream: str, *, timeout: float, poll: float = 0.05) -> bool:
        """Wait until no request is in flight on ``upstream``; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.inflight.get(upstream, 0) > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll)
        return True

    async def _send(
        self, path: str, body: dict[str, Any], ex: Exchange, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        assert self._session is not None, "Gateway.open() was not called"
        try:
            return await self._session.post(
                self.upstream.base_url + path,
                data=orjson.dumps(body),
                headers={**self.upstream.headers, "Content-Type": "application/json"},
            )
        except aiohttp.ClientError as e:
            ex.status = "error"
            raise NotReady(f"the model server is unreachable: {e}", headers=headers) from e

    async def _error_passthrough(
        self, resp: aiohttp.ClientResponse, ex: Exchange, headers: dict[str, str], t0: float
    ) -> Response:
        payload = await resp.read()
        resp.release()
        ex.status = "error"
        ex.upstream_status = resp.status
        ex.latency_ms = (time.perf_counter() - t0) * 1000
        err = openai_error(resp.status, payload)
        ex.output = err["error"]["message"][:2000]
        self.sink(ex)
        return Response(
            orjson.dumps(err),
            status_code=resp.status,
            media_type="application/json",
            headers=headers,
        )

    async def _relay(
        self,
        resp: aiohttp.ClientResponse,
        ex: Exchange,
        t0: float,
        wants_usage: bool,
        upstream: str,
        request: Request,
    ) -> AsyncIterator[bytes]:
        """Pass vLLM's events on. A client that hangs up is noticed at the next check (every
        `GONE_CHECK_S`, and before the end): the answer is logged "aborted" and the upstream
        connection dropped, so vLLM stops. Starlette's own watch for the hang-up cancels this
        only when the relay waits for vLLM; a relay that finds vLLM's events already buffered
        (a busy machine, the whole answer made while the gateway was not scheduled) would
        otherwise run to the end and log an answer nobody received as "ok"."""
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        ex.status = "aborted"
        checked = time.monotonic()
        try:
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    await asyncio.sleep(0)  # let a pending hang-up reach the connection
                    if await request.is_disconnected():
                        break  # the client left before the end: "aborted"
                    ex.status = "ok"
                    yield b"data: [DONE]\n\n"
                    continue
                if time.monotonic() - checked >= GONE_CHECK_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        break
                chunk = orjson.loads(payload)
                if "error" in chunk:
                    ex.status = "error"
                    err = chunk["error"]
                    status = err.get("code") if isinstance(err, dict) else None
                    status = status if isinstance(status, int) else 500
                    yield b"data: " + orjson.dumps(openai_error(status, payload)) + b"\n\n"
                    continue
                usage = chunk.get("usage")
                if usage:
                    ex.prompt_tokens = usage.get("prompt_tokens")
                    ex.completion_tokens = usage.get("completion_tokens")
                for choice in chunk.get("choices") or ():
                    idx = choice.get("index", 0)
                    texts.setdefault(idx, []).append(_delta_of(choice, ex.endpoint))
                    if choice.get("finish_reason"):
                        finish[idx] = choice["finish_reason"]
                if usage and not chunk.get("choices") and not wants_usage:
                    continue  # the usage chunk we asked for on our own behalf
                if not wants_usage:
                    chunk.pop("usage", None)
                chunk["id"] = ex.id
                chunk["model"] = ex.model
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        except asyncio.CancelledError:
            ex.status = "aborted"
            raise
        finally:
            if ex.status == "aborted":
                resp.close()  # drop the upstream connection: vLLM aborts the generation
            else:
                resp.release()
            ex.output = "".join(texts.get(0, []))
            ex.extra_outputs = ["".join(texts[i]) for i in sorted(texts) if i != 0]
            ex.finish_reason = finish.get(0)
            ex.latency_ms = (time.perf_counter() - t0) * 1000
            self._done(upstream)
            self.sink(ex)
