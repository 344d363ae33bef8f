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
import html
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel

from daemon.auth import COOKIE, Authenticator, AuthError, Caller, PermissionDenied
from daemon.config import Settings
from daemon.connections import ConnectionLimits, limited_protocol
from daemon.cycle import (
    TERMINAL,
    CycleDeps,
    CycleInterrupted,
    CycleRunning,
    cycle_progress,
    new_cycle,
    resume_cycle,
    run_cycle,
    settle,
)
from daemon.http import build_app, register_errors
from daemon.metrics import Metrics
from daemon.promotion import Promoter, PromotionError, UnknownVersion
from daemon.report import index_entry, load_report, render_index
from daemon.scheduler import CycleScheduler, Verdict, should_start
from daemon.versions import VERSION_RE, Manifest
from feedback.errors import FeedbackError
from feedback.routes import build_router as feedback_router
from feedback.store import Cycle, Interaction, Store
from feedback.writer import Writer
from learners.data import load_tokenizer
from learners.run import stop_children
from serving.engine import EngineError, EngineSettings, VllmEngine
from serving.gateway import (
    Exchange,
    Gateway,
    GatewayError,
    Limits,
    ModelNotFound,
    NotReady,
    Target,
)
from serving.memory import read_shape, served_context
from serving.models import ModelError, resolve_model

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error shape, which every error answer has (for the OpenAPI document)."""

    error: ErrorDetail


_ERROR_WHY = {
    400: "invalid request, or a limit exceeded",
    401: "missing or invalid key",
    403: "the key may not do this",
    404: "an unknown model, interaction, version, cycle or report",
    409: "refused in the current state",
    413: "the body is over the size limit",
    422: "invalid body",
    503: "not ready, or the store is busy: retry",
    507: "the disk is full: nothing was stored; retry once there is room",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers of a router, for the OpenAPI document."""
    return {s: {"model": ErrorBody, "description": _ERROR_WHY[s]} for s in statuses}


# A report page without an admin key answers with the key form (HTML), not an error object.
_KEY_FORM = {"content": {"text/html": {"schema": {"type": "string"}}}}
_REPORT = {
    "content": {media: {"schema": {"type": "string"}} for media in ("text/html", "text/markdown")}
    | {"application/json": {"schema": {"type": "object"}}}
}
_HTML: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/html": {"schema": {"type": "string"}}}},
    401: {**_KEY_FORM, "description": "no key: the key form"},
    403: {**_KEY_FORM, "description": "not an admin key: the key form"},
}


_STR = {"type": "string"}
_BOOL = {"type": "boolean"}


def _body(**props: dict[str, Any]) -> dict[str, Any]:
    """An optional JSON object body of an admin route, for the OpenAPI document (the route
    reads the raw body with `_json_body`)."""
    schema = {"type": "object", "properties": props}
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": schema}}}}


def fit_to_model(settings: Settings, model_source: str) -> Settings:
    """``serving.max_model_len`` capped at the model's own context length, and
    ``training.max_len`` at what is served; each change is logged."""
    shape = read_shape(model_source, settings.serving.dtype)
    served, why = served_context(settings.serving.max_model_len, shape)
    if why:
        log.info("%s", why)
    training = settings.training
    if served is not None and training.max_len > served:
        log.info(
            "training.max_len %d -> %d: no longer than what is served", training.max_len, served
        )
        training = training.model_copy(update={"max_len": served})
    serving = settings.serving.model_copy(update={"max_model_len": served})
    return settings.model_copy(update={"serving": serving, "training": training})


class Daemon:
    """Wires the components together; `app` is the ASGI application."""

    def __init__(self, settings: Settings, *, model_source: str | None) -> None:
        if model_source is not None and not settings.serving.vllm_url:
            settings = fit_to_model(settings, model_source)
        self.settings = settings
        self.on_fatal: Callable[[str], None] | None = None  # set by `run`: stop serving
        self.start_error: str | None = None  # why vLLM could not start, if it could not
        self.started = time.time()
        self.adapters_dir = settings.data_dir / "adapters"
        self.store = Store(settings.db_path)
        self.store.migrate()
        self.health = self.store.check()
        self.reader = Store(settings.db_path, readonly=True)
        self.writer = Writer(self.store, max_pending=settings.store.log_queue_size)
        s = settings.serving
        if s.vllm_url:
            self.engine = VllmEngine(None, url=s.vllm_url, api_key=s.vllm_api_key)
            # training and scoring need the weights: `model` names them (else cycles fail)
            self.base_model = model_source or s.vllm_url
        else:
            assert model_source is not None
            self.base_model = model_source
            self.engine = VllmEngine(
                EngineSettings(
                    model=model_source,
                    max_model_len=s.max_model_len,
                    dtype=s.dtype,
                    gpu_memory_utilization=s.gpu_memory_utilization,
                    kv_cache_gib=s.kv_cache_gib,
                    tensor_parallel_size=s.tensor_parallel_size,
                    data_parallel_size=s.data_parallel_size,
                    max_loras=s.max_loras,
                    max_lora_rank=settings.max_lora_rank,
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
        self.promoter = Promoter(
            engine=self.engine,
            gateway=self.gateway,
            writer=self.writer,
            reader=self.reader,
            data_dir=settings.data_dir,
            drain_timeout_s=settings.gate.drain_timeout_s,
            base_model=model_source,
            max_rank=settings.max_lora_rank,
            on_change=lambda action: self.metrics.promotions.labels(action).inc(),
        )
        # Whenever vLLM (re)starts, before it takes requests: adapters are loaded again only if
        # they still pass admission, and the alias is made to name a version vLLM holds.
        self.engine.recheck = self.promoter.recheck
        self.engine.on_healthy = self.promoter.reconcile
        self.cycle_deps = CycleDeps(
            settings=settings,
            base_model=self.base_model,
            reader=self.reader,
            writer=self.writer,
            engine=self.engine,
            promoter=self.promoter,
            tokenizer=self._tokenizer,
            on_state=self._cycle_metrics,
        )
        self._tok: Any = None
        self._cycle: asyncio.Task[Cycle] | None = None
        self._cycle_id: str | None = None
        self._to_resume = self._interrupted_cycles()
        self.scheduler = (
            CycleScheduler(settings.schedule, self._scheduled_tick)
            if settings.schedule.enabled
            else None
        )
        self._last_verdict: Verdict | None = None
        self._stop_requested = False
        self.auth = Authenticator(settings.api_keys, settings.admin_keys)
        self.metrics = Metrics()
        self.metrics.watch(self._live_numbers, lambda: self.promoted or "base")
        self._bring_up: asyncio.Task[None] | None = None
        self.app = self._build_app()

    @property
    def promoted(self) -> str | None:
        return self.promoter.promoted

    def _tokenizer(self) -> Any:
        if self._tok is None:
            self._tok = load_tokenizer(self.base_model)
        return self._tok

    def _interrupted_cycles(self) -> list[Cycle]:
        """Cycles a crash or a stop left unfinished: the newest is resumed once vLLM is up,
        older ones are marked failed (one cycle runs at a time, so there is rarely more)."""
        open_ = [c for c in self.reader.cycles(limit=50) if c.state not in TERMINAL]
        for c in open_[1:]:
            reason = f"interrupted in state {c.state!r}; a newer cycle superseded it"
            failed = replace(c, state="failed", decision="failed", reasons=[reason, *c.reasons])
            self.writer.call_sync(partial(Store.put_cycle, cycle=failed))
            log.warning("cycle %s: %s", c.id, reason)
        return open_[:1]

    def on_stop_signal(self) -> None:
        """The first SIGTERM/SIGINT: while uvicorn drains requests, stop starting cycles and ask
        training to stop at its next step boundary (in a thread: this runs in a handler)."""
        if self._stop_requested:
            return
        self._stop_requested = True
        log.info("stop requested: draining requests; training stops at its next step")
        if self.scheduler is not None:
            self.scheduler.shutdown()
        if self.running_cycle():
            threading.Thread(
                target=stop_children, args=(self.settings.shutdown_timeout_s,), daemon=True
            ).start()

    def _cycle_metrics(self, cycle: Cycle) -> None:
        m = self.metrics
        m.cycle_state.clear()
        if cycle.state not in TERMINAL:
            m.cycle_state.labels(cycle.state).set(1)
            return
        m.cycles.labels(cycle.decision or cycle.state).inc()
        m.cycle_seconds.observe(max(0.0, cycle.updated_at - cycle.created_at))
        for reason in cycle.reasons:
            head, _, _ = reason.partition(":")
            verdict, _, check = head.partition(" ")
            if verdict in ("pass", "FAIL") and check and " " not in check:
                m.gate_checks.labels(check, "pass" if verdict == "pass" else "fail").inc()
        row = self.reader.get_version(cycle.version) if cycle.version else None
        manifest = Manifest.from_json(row["manifest"]) if row else None
        train = manifest.metrics.training if manifest else {}
        for when in ("first", "final"):
            if isinstance(train.get(f"{when}_loss"), int | float):
                m.training_loss.labels(when).set(train[f"{when}_loss"])

    # -- cycles -----------------------------------------------------------------
    def running_cycle(self) -> str | None:
        if self._cycle is not None and not self._cycle.done():
            return self._cycle_id
        return None

    def _cycle_progress(self) -> dict[str, Any] | None:
        """The running cycle's stage and progress (`daemon.cycle.cycle_progress`), or None."""
        running = self.running_cycle()
        cycle = self.reader.get_cycle(running) if running else None
        return cycle_progress(cycle, self.settings.data_dir, time.time()) if cycle else None

    async def start_cycle(self, trigger: str, actor: str) -> Cycle:
        """Start a cycle now in the background; `CycleRunning` if one is running."""
        if self.running_cycle():
            raise CycleRunning(f"cycle {self._cycle_id} is running; one at a time")
        if self._stop_requested:
            raise NotReady("the daemon is stopping")
        if not self.engine.ready:
            raise NotReady("the model server is starting or restarting; retry shortly")
        cycle = await self.writer.call(lambda s: s.put_cycle(new_cycle(trigger)))
        self._cycle_id = cycle.id
        self._cycle = asyncio.create_task(self._run_cycle(cycle, actor), name=f"cycle-{cycle.id}")
        return cycle

    async def _run_cycle(self, cycle: Cycle, actor: str, *, resume: bool = False) -> Cycle:
        try:
            if resume:
                return await resume_cycle(self.cycle_deps, cycle)
            return await run_cycle(self.cycle_deps, cycle, actor=actor)
        except CycleInterrupted as e:
            current = self.reader.get_cycle(cycle.id) or cycle
            log.info("cycle %s: %s; it resumes when the daemon starts again", cycle.id, e)
            return current
        except Exception as e:  # a bug: record it rather than leave the cycle running
            log.exception("cycle %s crashed", cycle.id)
            current = self.reader.get_cycle(cycle.id) or cycle
            failed = replace(
                current,
                state="failed",
                decision="failed",
                reasons=[f"internal error: {type(e).__name__}: {e}"],
            )
            try:
                return await self.writer.call(lambda s: s.put_cycle(failed))
            except FeedbackError as store_error:  # e.g. the disk is full
                log.error("cycle %s: its failure could not be recorded (%s); it is taken up "
                          "again at the next start", cycle.id, store_error)  # fmt: skip
                return failed

    async def _cancel_cycle(self) -> None:
        """On stop: training stops at a step boundary; the cycle keeps its state, and the
        next start resumes it."""
        if self._cycle is not None and not self._cycle.done():
            asked = await asyncio.to_thread(stop_children, self.settings.shutdown_timeout_s)
            log.info("stopping the running cycle %s (%d learner children asked)",
                     self._cycle_id, asked)  # fmt: skip
            self._cycle.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._cycle

    def trigger_verdict(self, now: float | None = None) -> Verdict:
        """Would a scheduled cycle start now? (`daemon.scheduler.should_start`)"""
        if not self.engine.ready:
            return Verdict(False, "the model server is not ready")
        last = self.reader.cycles(limit=1)
        since = last[0].created_at if last else 0.0
        cfg = self.settings.schedule
        return should_start(
            time.time() if now is None else now,
            running=self.running_cycle(),
            new_feedback=self.reader.feedback_count_since(since),
            last_cycle_at=last[0].created_at if last else None,
            min_new_feedback=cfg.min_new_feedback,
            min_minutes_between=cfg.min_minutes_between,
        )

    async def _scheduled_tick(self) -> None:
        verdict = self.trigger_verdict()
        self._last_verdict = verdict
        if not verdict.start:
            log.info("scheduled check: no cycle: %s", verdict.reason)
            return
        try:
            cycle = await self.start_cycle("schedule", "scheduler")
            log.info("scheduled check: cycle %s started: %s", cycle.id, verdict.reason)
        except (CycleRunning, NotReady) as e:
            log.info("scheduled check: no cycle: %s", e)

    def _next_cycle(self) -> dict[str, Any] | None:
        if self.scheduler is None:
            return {"at": None, "schedule": "off", "would_start": False,
                    "reason": "scheduling is off (schedule.enabled = false)"}  # fmt: skip
        at = self.scheduler.next_run()
        verdict = self.trigger_verdict()
        return {
            "at": at.isoformat() if at else None,
            "schedule": self.scheduler.describe(),
            "would_start": verdict.start,
            "reason": verdict.reason,
        }

    # -- wiring -----------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = build_app(
            lifespan=self._lifespan,
            metrics=self.metrics,
            max_body_bytes=self.settings.limits.max_body_bytes,
            ready=self.readiness,
        )
        register_errors(
            app,
            GatewayError,
            FeedbackError,
            EngineError,
            AuthError,
            ModelError,
            PromotionError,
            CycleRunning,
            CycleNotFound,
            BadRequest,
        )
        app.include_router(
            self.gateway.router(self.auth.inference),
            responses=_errors(400, 401, 403, 404, 413, 503),
        )
        app.include_router(
            feedback_router(
                self.writer, auth=self.auth.inference, on_stored=self.metrics.feedback.inc
            ),
            responses=_errors(401, 404, 413, 422, 503, 507),
        )
        app.include_router(
            self._admin_router(), responses=_errors(400, 401, 403, 404, 409, 413, 422, 503, 507)
        )
        app.include_router(self._reports_router(), responses=_errors(404, 413, 422))
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
            stack.push_async_callback(self._cancel_cycle)
            if self.scheduler is not None:
                self.scheduler.start()
                stack.callback(self.scheduler.shutdown)
            stack.push_async_callback(self.promoter.wait_drained)
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
            # A first start that fails is not retried: the daemon stops with the reason.
            self.start_error = str(e)
            log.error("%s", e)
            if self.on_fatal is not None:
                self.on_fatal(self.start_error)
            return
        # the alias was reconciled before vLLM turned ready (engine.on_healthy)
        for cycle in self._to_resume:
            self._cycle_id = cycle.id
            self._cycle = asyncio.create_task(
                self._run_cycle(cycle, "restart", resume=True), name=f"cycle-{cycle.id}"
            )
        self._to_resume = []

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
        if version not in self.engine.loaded_adapters:
            path = await asyncio.to_thread(self.promoter.admit, version)
            await self.engine.load_adapter(version, str(path))
        if model == "adaptd" and version != self.promoted:
            return await self.resolve(model, caller)  # promoted meanwhile: take the new one
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
            why = self.engine.last_error
            return False, "the model server is starting or restarting" + (f": {why}" if why else "")
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
                "last_error": self.engine.last_error,
                "kv_cache_bytes": self.engine.kv_cache_bytes,
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
                "journal_mode": self.health.journal_mode,
                "synchronous": self.health.synchronous,
            },
            "next_cycle": self._next_cycle(),
            "running_cycle": self.running_cycle(),
            "cycle_progress": self._cycle_progress(),
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
                for r in self.reader.versions()
            ]
            return Response(
                orjson.dumps({"promoted": self.promoted, "versions": rows}),
                media_type="application/json",
            )

        @router.post("/versions/{version}/promote", openapi_extra=_body(reason=_STR, force=_BOOL))
        async def promote(
            version: str, request: Request, caller: Caller = Depends(self.auth.admin)
        ) -> Response:
            body = await _json_body(request)
            row = self.reader.get_version(version)
            if row is None:
                raise UnknownVersion(f"unknown version {version!r}: see `adaptd versions`")
            manifest = Manifest.from_json(row["manifest"])
            verdict = manifest.decision if manifest else None
            if not (verdict and verdict.passed) and not body.get("force"):
                outcome = verdict.outcome if verdict else "not judged"
                raise PromotionError(
                    f"version {version} did not pass the gate ({outcome}); "
                    'send {"force": true} to promote it anyway'
                )
            reason = str(body.get("reason") or "promoted by an operator")
            cycle = await settle(
                self.cycle_deps, version, approve=True, actor=caller.label, reason=reason
            )
            return _json(self._alias_state(cycle))

        @router.post("/versions/{version}/reject", openapi_extra=_body(reason=_STR))
        async def reject(
            version: str, request: Request, caller: Caller = Depends(self.auth.admin)
        ) -> Response:
            body = await _json_body(request)
            if self.reader.get_version(version) is None:
                raise UnknownVersion(f"unknown version {version!r}: see `adaptd versions`")
            cycle = self.reader.cycle_of_version(version)
            if cycle is None or cycle.state != "awaiting_approval":
                raise PromotionError(f"version {version} is not awaiting approval")
            cycle = await settle(
                self.cycle_deps,
                version,
                approve=False,
                actor=caller.label,
                reason=str(body.get("reason") or ""),
            )
            return _json(self._alias_state(cycle))

        @router.post("/rollback", openapi_extra=_body(version=_STR, reason=_STR))
        async def rollback(request: Request, caller: Caller = Depends(self.auth.admin)) -> Response:
            body = await _json_body(request)
            target = body.get("version")
            if target is not None and not isinstance(target, str):
                raise PromotionError('`version` must be a version name or "base"')
            await self.promoter.rollback(
                target, actor=caller.label, reason=str(body.get("reason") or "rollback")
            )
            return _json(self._alias_state(None))

        @router.get("/promotions")
        async def promotions() -> Response:
            return _json({"promotions": [asdict(p) for p in self.reader.promotions()]})

        @router.post("/cycles", status_code=202)
        async def start_cycle(caller: Caller = Depends(self.auth.admin)) -> Response:
            cycle = await self.start_cycle("manual", caller.label)
            return _json(cycle.to_dict(), status=202)

        @router.get("/cycles")
        async def cycles() -> Response:
            return _json({"cycles": [c.to_dict() for c in self.reader.cycles()]})

        @router.get("/cycles/{cycle_id}")
        async def get_cycle(cycle_id: str) -> Response:
            cycle = self.reader.get_cycle(cycle_id)
            if cycle is None:
                raise CycleNotFound(f"unknown cycle {cycle_id!r}")
            return _json(cycle.to_dict())

        return router

    def _alias_state(self, cycle: Cycle | None) -> dict[str, Any]:
        history = self.reader.promotions()
        return {
            "alias": "adaptd",
            "version": self.promoted or "base",
            "last": asdict(history[-1]) if history else None,
            "cycle": cycle.to_dict() if cycle else None,
        }

    def _reports_router(self) -> APIRouter:
        router = APIRouter(prefix="/reports", tags=["reports"])
        reports = self.settings.data_dir / "reports"

        def page_auth(request: Request) -> Response | None:
            try:
                self.auth.admin_page(request)
            except AuthError as e:
                return HTMLResponse(login_page(str(e)), status_code=e.status)
            return None

        @router.get("", response_class=HTMLResponse, responses=_HTML)
        async def index(request: Request) -> Response:
            if (denied := page_auth(request)) is not None:
                return denied
            return HTMLResponse(render_index(self._report_entries()))

        @router.get("/{name}", responses={**_HTML, 200: _REPORT})
        async def report(name: str, request: Request) -> Response:
            if (denied := page_auth(request)) is not None:
                return denied
            version, _, ext = name.partition(".")
            if ext not in ("", "html", "json", "md") or not VERSION_RE.match(version):
                raise CycleNotFound(f"no report {name!r}: use /reports/VERSION[.json|.md]")
            path = reports / version / f"report.{ext or 'html'}"
            if not path.is_file():
                raise CycleNotFound(f"no report for {version}")
            media = {"": "text/html", "html": "text/html", "json": "application/json",
                     "md": "text/markdown"}[ext]  # fmt: skip
            return Response(path.read_bytes(), media_type=f"{media}; charset=utf-8")

        return router

    def _report_entries(self) -> list[dict[str, Any]]:
        """One row per cycle; a cycle whose report is missing or unreadable still shows."""
        out = []
        for c in self.reader.cycles(limit=1000):
            report = None
            if c.version:
                try:
                    report = load_report(self.settings.data_dir / "reports", c.version)
                except ValueError as e:
                    log.warning("report of %s is unreadable: %s", c.version, e)
            row: dict[str, Any] = index_entry(report) if report else {"version": c.version}
            row.update(cycle_id=c.id, created_at=c.created_at, outcome=c.decision or c.state)
            out.append(row)
        return out


class BadRequest(Exception):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class CycleNotFound(Exception):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def login_page(message: str) -> str:
    """A key form for report pages opened in a browser; the key goes into a cookie."""
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>adaptd reports</title></head>"
        "<body style='font-family:sans-serif;max-width:30em;margin:4em auto'>"
        f"<h1>adaptd reports</h1><p>{html.escape(message)}</p>"
        "<form id='f'><label>Admin key <input id='k' type='password' autofocus></label> "
        "<button>Open</button></form><script>"
        "document.getElementById('f').addEventListener('submit',function(e){e.preventDefault();"
        f"document.cookie='{COOKIE}='+encodeURIComponent(document.getElementById('k').value)"
        "+';path=/reports;SameSite=Strict';location.reload();});</script></body></html>"
    )


class DataDirBusy(Exception):
    pass


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data directory for the life of the process: SQLite takes
    one writing daemon, and two daemons would also race for version names."""
    import fcntl

    fd = os.open(data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirBusy(
            f"another adaptd is running on {data_dir}: one daemon per data directory"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def connection_limits(settings: Settings) -> ConnectionLimits:
    lim = settings.limits
    return ConnectionLimits(
        max_header_bytes=lim.max_header_bytes,
        max_headers=lim.max_headers,
        header_timeout_s=lim.header_timeout_s,
        body_timeout_s=lim.body_timeout_s,
        max_connections=lim.max_connections,
    )


def run(settings: Settings) -> None:
    """Serve until stopped; blocks."""
    # A write past the file-size limit (RLIMIT_FSIZE) kills a process with SIGXFSZ by default.
    # CPython ignores it at start-up already; the store relies on that (the write fails with
    # EFBIG, as on a full disk with ENOSPC, and feedback is answered 507), so say it here too.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Absolute paths from here on: vLLM (possibly external) is told where adapters live.
    settings = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
    lock_data_dir(settings.data_dir)
    source = None
    if not settings.serving.vllm_url or settings.model:
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
        http=limited_protocol(connection_limits(settings), daemon.metrics.refused_inc),
        ws="none",
    )

    # uvicorn drains on the first SIGTERM/SIGINT, then re-raises the signal once it has
    # restored the handlers that were there before: make that a clean exit, status 0.
    def stopped(signum: int, frame: object) -> None:
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopped)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            daemon.on_stop_signal()
            super().handle_exit(sig, frame)

    server = Server(config)

    def fatal(reason: str) -> None:  # vLLM could not start: stop serving, exit non-zero
        server.should_exit = True

    daemon.on_fatal = fatal
    try:
        server.run()
    except SystemExit as e:
        if e.code == 0 and daemon.start_error is None:
            log.info("adaptd stopped")
            raise
        if daemon.start_error is None:
            raise
    if daemon.start_error is not None:
        print(f"adaptd: {daemon.start_error}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    log.info("adaptd stopped")
