"""The long-running process: it owns the store, the writer, vLLM and the HTTP app.

`run()` opens the store (migrations, quick_check), obtains the model, builds the
app and serves it with uvicorn. Resources are entered into one `AsyncExitStack`
in the app's lifespan, so they are released in reverse order on shutdown: vLLM
stops, then the writer flushes the interaction log, then the store closes.
uvicorn drains requests in flight on the first SIGTERM/SIGINT (up to
``shutdown_timeout_s``) and exits at once on a second one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import Response

from daemon.auth import Authenticator, AuthError, PermissionDenied
from daemon.config import Settings
from daemon.http import build_app, register_errors
from daemon.metrics import Metrics
from feedback.errors import FeedbackError
from feedback.routes import build_router as feedback_router
from feedback.store import Interaction, Store
from feedback.writer import Writer
from serving.engine import EngineError, EngineSettings, VllmEngine
from serving.gateway import Exchange, Gateway, GatewayError, Limits, ModelNotFound, Target
from serving.models import ModelError, resolve_model

log = logging.getLogger(__name__)


class Daemon:
    """Wires the components together; `app` is the ASGI application."""

    def __init__(self, settings: Settings, *, model_source: str | None) -> None:
        self.settings = settings
        self.started = time.time()
        self.adapters_dir = settings.data_dir / "adapters"
        self.store = Store(settings.db_path)
        self.store.migrate()
        self.health = self.store.check()
        self.reader = Store(settings.db_path, readonly=True)
        self.writer = Writer(self.store, max_pending=settings.store.log_queue_size)
        self.promoted: str | None = self.reader.promoted_version()
        s = settings.serving
        if s.vllm_url:
            self.engine = VllmEngine(None, url=s.vllm_url, api_key=s.vllm_api_key)
            self.base_model = s.vllm_url
        else:
            assert model_source is not None
            self.base_model = model_source
            self.engine = VllmEngine(
                EngineSettings(
                    model=model_source,
                    max_model_len=s.max_model_len,
                    dtype=s.dtype,
                    gpu_memory_utilization=s.gpu_memory_utilization,
                    tensor_parallel_size=s.tensor_parallel_size,
                    data_parallel_size=s.data_parallel_size,
                    max_loras=s.max_loras,
                    max_lora_rank=s.max_lora_rank,
                    max_num_seqs=s.max_num_seqs,
                    extra_args=tuple(s.extra_args),
                    hub_offline=Path(model_source).is_dir(),
                    startup_timeout_s=s.startup_timeout_s,
                )
            )
        lim = settings.limits
        self.gateway = Gateway(
            self.engine,
            self.resolve,
            self.log_exchange,
            limits=Limits(
                max_tokens=lim.max_tokens,
                max_n=lim.max_n,
                max_prompt_chars=lim.max_prompt_chars,
                max_messages=lim.max_messages,
            ),
            list_models=self.list_models,
        )
        self.auth = Authenticator(settings.api_keys, settings.admin_keys)
        self.metrics = Metrics()
        self.metrics.watch(self._live_numbers, lambda: self.promoted or "base")
        self._bring_up: asyncio.Task[None] | None = None
        self.app = self._build_app()

    # -- wiring -----------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = build_app(
            lifespan=self._lifespan,
            metrics=self.metrics,
            max_body_bytes=self.settings.limits.max_body_bytes,
            ready=self.readiness,
        )
        register_errors(app, GatewayError, FeedbackError, EngineError, AuthError, ModelError)
        app.include_router(self.gateway.router(self.auth.inference))
        app.include_router(
            feedback_router(
                self.writer, auth=self.auth.inference, on_stored=self.metrics.feedback.inc
            )
        )
        app.include_router(self._admin_router())
        return app

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            stack.callback(self.store.close)
            stack.callback(self.reader.close)
            stack.callback(self.writer.close)
            stack.push_async_callback(self.engine.stop)
            await self.gateway.open()
            stack.push_async_callback(self.gateway.close)
            self._bring_up = asyncio.create_task(self._start_engine(), name="bring-up")
            stack.push_async_callback(self._cancel_bring_up)
            log.info(
                "adaptd listening on http://%s:%d (auth %s)",
                self.settings.host,
                self.settings.port,
                "on" if self.auth.enabled else "off: loopback only",
            )
            yield
            log.info("stopping: draining done, shutting components down")

    async def _cancel_bring_up(self) -> None:
        if self._bring_up is not None and not self._bring_up.done():
            self._bring_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._bring_up

    async def _start_engine(self) -> None:
        try:
            await self.engine.start()
        except EngineError as e:
            log.error("vLLM did not start: %s", e)
            return
        if self.promoted:
            try:
                await self.engine.load_adapter(
                    self.promoted, str(self.adapters_dir / self.promoted)
                )
            except EngineError as e:
                log.error("the promoted adapter %s could not be loaded: %s", self.promoted, e)

    # -- callbacks the components use ---------------------------------------------
    async def resolve(self, model: str, caller: Any) -> Target:
        if model == "adaptd":
            version = self.promoted
        elif model == "base":
            version = None
        else:
            if model not in self.reader.version_names():
                raise ModelNotFound(
                    f"unknown model {model!r}: use `adaptd`, `base` or a version name",
                    param="model",
                )
            if not caller.is_admin:
                raise PermissionDenied("serving a version by name needs an admin key")
            version = model
        if version is None:
            return Target("base", "base")
        await self.engine.load_adapter(version, str(self.adapters_dir / version))
        return Target(version, version)

    async def list_models(self, caller: Any) -> list[str]:
        names = ["adaptd", "base"]
        if caller.is_admin:
            names += self.reader.version_names()
        return names

    def log_exchange(self, ex: Exchange) -> None:
        self.writer.log_interaction(
            Interaction(
                id=ex.id,
                created_at=ex.created_at,
                endpoint=ex.endpoint,
                model=ex.model,
                version=ex.version,
                caller=ex.caller,
                request=ex.request,
                params=ex.params,
                output=ex.output,
                finish_reason=ex.finish_reason,
                prompt_tokens=ex.prompt_tokens,
                completion_tokens=ex.completion_tokens,
                latency_ms=ex.latency_ms,
                status=ex.status,
                stream=ex.stream,
            )
        )
        if ex.prompt_tokens:
            self.metrics.tokens.labels("prompt", ex.version).inc(ex.prompt_tokens)
        if ex.completion_tokens:
            self.metrics.tokens.labels("completion", ex.version).inc(ex.completion_tokens)

    async def readiness(self) -> tuple[bool, str]:
        if not self.engine.ready:
            return False, "the model server is starting or restarting"
        return True, "serving"

    def _live_numbers(self) -> dict[str, float]:
        w = self.writer.stats()
        return {
            "logged": w.logged,
            "dropped": w.dropped,
            "failed": w.failed,
            "pending": w.pending,
            "ready": float(self.engine.ready),
            "restarts": self.engine.restarts,
        }

    def status(self) -> dict[str, Any]:
        counts = self.reader.feedback_counts()
        w = self.writer.stats()
        return {
            "serving": {"alias": "adaptd", "version": self.promoted or "base"},
            "base_model": self.base_model,
            "engine": {
                "ready": self.engine.ready,
                "managed": self.engine.managed,
                "pid": self.engine.pid,
                "restarts": self.engine.restarts,
                "adapters_loaded": sorted(self.engine.loaded_adapters),
            },
            "feedback": {
                "total": counts.total,
                "positive": counts.positive,
                "negative": counts.negative,
                "neutral": counts.neutral,
                "corrections": counts.corrections,
            },
            "interactions": counts.interactions,
            "interaction_log": {"logged": w.logged, "dropped": w.dropped, "pending": w.pending},
            "store": {
                "sqlite_version": self.health.sqlite_version,
                "wal_reset_bug": self.health.wal_reset_bug,
            },
            "next_cycle": None,
            "running_cycle": None,
            "uptime_s": round(time.time() - self.started, 1),
        }

    def _admin_router(self) -> APIRouter:
        router = APIRouter(prefix="/admin", dependencies=[Depends(self.auth.admin)], tags=["admin"])

        @router.get("/status")
        async def status() -> Response:
            return Response(orjson.dumps(self.status()), media_type="application/json")

        @router.get("/versions")
        async def versions() -> Response:
            rows = [
                {
                    **r,
                    "manifest": orjson.loads(r["manifest"]) if r["manifest"] else None,
                    "promoted": r["name"] == self.promoted,
                }
                for r in self.reader.db["adapter_versions"].rows_where(order_by="created_at")
            ]
            return Response(
                orjson.dumps({"promoted": self.promoted, "versions": rows}),
                media_type="application/json",
            )

        return router


def run(settings: Settings) -> None:
    """Serve until stopped; blocks."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    source = None
    if not settings.serving.vllm_url:
        resolved = resolve_model(settings.model, cache_dir=settings.data_dir / "models")
        source = resolved.source
        log.info("model: %s (%s)", resolved.name, source)
    daemon = Daemon(settings, model_source=source)
    config = uvicorn.Config(
        daemon.app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        loop="uvloop",
        http="httptools",
    )

    # uvicorn drains on the first SIGTERM/SIGINT, then re-raises the signal once it has
    # restored the handlers that were there before: make that a clean exit, status 0.
    def stopped(signum: int, frame: object) -> None:
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopped)
    try:
        uvicorn.Server(config).run()
    except SystemExit as e:
        if e.code == 0:
            log.info("adaptd stopped")
        raise
    log.info("adaptd stopped")
