"""vLLM's OpenAI server as a supervised child process, and its control API.

This is the one module that knows vLLM's command line and control endpoints
(`/health`, `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`). The server
listens on a private loopback port, protected by a random API key that only the
daemon knows; the gateway is the only thing in front of it.

Lifecycle: `start()` sizes vLLM's memory (`serving.memory`: on the CPU the KV cache is an
amount, refused before vLLM starts if it cannot fit), launches the server under
`serving._reaper` (so no vLLM process outlives the daemon, even after SIGKILL) and waits until
it is healthy, logging progress. If vLLM exits before it was ever healthy, `start()` raises
`EngineStartError` at once with the cause and the setting to change (`serving.startup`): a
first start is not retried. Once it has been healthy, a supervisor task restarts it with
exponential back-off if it dies; meanwhile `ready` is False and `last_error` says why. Adapters that were loaded are loaded again
after a restart, each first passed to the owner's `recheck` (raise to leave it out: its files
may have changed since); then the owner's `on_healthy` runs, and only then does `ready` turn
true, so no request reaches a server whose adapters are not settled yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from serving.memory import (
    MemoryFitError,
    kv_space_from_env,
    plan_kv_cache,
    read_memory,
    read_shape,
)
from serving.startup import diagnose

log = logging.getLogger(__name__)
vllm_log = logging.getLogger("adaptd.vllm")

BASE_NAME = "base"


class EngineError(Exception):
    status = 503
    type = "server_error"
    code = "engine_unavailable"


class EngineStartError(EngineError):
    """vLLM could not start (or would not fit): the message is one line with the cause and the
    setting to change."""


class AdapterLoadError(EngineError):
    status = 500
    code = "adapter_load_failed"


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int
    seconds: float
    finish_reason: str | None = None  # "length": cut off by max_tokens


@dataclass(frozen=True)
class EngineSettings:
    """What the daemon passes to vLLM; every field maps to one vLLM flag."""

    model: str
    max_model_len: int | None = 2048
    dtype: str = "auto"
    gpu_memory_utilization: float | None = None  # None: 0.9 on a GPU; on the CPU, see kv_cache_gib
    kv_cache_gib: float | None = None  # CPU: the KV cache's size (None: from the model and memory)
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    max_loras: int = 2
    max_lora_rank: int = 16
    max_num_seqs: int | None = None
    extra_args: tuple[str, ...] = ()
    hub_offline: bool = False
    startup_timeout_s: float = 900.0
    stop_grace_s: float = 20.0
    env: dict[str, str] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# vLLM closes a connection left idle for VLLM_HTTP_TIMEOUT_KEEP_ALIVE seconds (5 by default). A
# client pool that keeps one longer can send a request on it just as the server closes it
# ("Can not write request body", seen in a promotion's probe between swaps 3 s apart), so the
# pools that talk to vLLM drop idle connections sooner.
UPSTREAM_KEEPALIVE_S = 4.0


def _has_cuda() -> bool:
    return Path("/dev/nvidia0").exists() or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def vllm_command(
    settings: EngineSettings, *, port: int, api_key: str, kv_cache_bytes: int | None = None
) -> list[str]:
    """vLLM's command line; ``kv_cache_bytes`` (the CPU's planned KV cache) replaces the memory
    share."""
    if kv_cache_bytes is not None:
        memory = ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
    else:
        util = settings.gpu_memory_utilization
        memory = ["--gpu-memory-utilization", str(0.9 if util is None else util)]
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        settings.model,
        "--served-model-name",
        BASE_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        api_key,
        "--enable-lora",
        "--max-loras",
        str(settings.max_loras),
        "--max-lora-rank",
        str(settings.max_lora_rank),
        "--dtype",
        settings.dtype,
        *memory,
        "--tensor-parallel-size",
        str(settings.tensor_parallel_size),
        "--disable-uvicorn-access-log",
        "--disable-fastapi-docs",
    ]
    if settings.data_parallel_size > 1:
        cmd += ["--data-parallel-size", str(settings.data_parallel_size)]
    if settings.max_model_len:
        cmd += ["--max-model-len", str(settings.max_model_len)]
    if settings.max_num_seqs:
        cmd += ["--max-num-seqs", str(settings.max_num_seqs)]
    return cmd + list(settings.extra_args)


class VllmEngine:
    """A vLLM server: managed (a child we start and supervise) or external (a URL)."""

    def __init__(
        self, settings: EngineSettings | None, *, url: str | None = None, api_key: str | None = None
    ) -> None:
        if (settings is None) == (url is None):
            raise ValueError("give either settings (managed) or url (external)")
        self.settings = settings
        self.managed = settings is not None
        self.port = _free_port() if url is None else 0
        self.base_url = url.rstrip("/") if url else f"http://127.0.0.1:{self.port}"
        # hex: a key starting with "-" would read as a flag on vLLM's command line
        self.api_key = api_key if url else secrets.token_hex(24)
        self.ready = False
        self.restarts = 0
        self.last_error: str | None = None  # why the last start or restart failed, until healthy
        self.started_at: float | None = None
        self.kv_cache_bytes: int | None = None  # the CPU's KV cache, as planned at start
        self._tail: deque[str] = deque(maxlen=200)  # vLLM's last lines, for a failed start
        self._proc: asyncio.subprocess.Process | None = None
        self._adapters: dict[str, str] = {}
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._load_lock = asyncio.Lock()
        # Set by the owner (see the module docstring): ``recheck(name)`` before an adapter is
        # loaded again after a restart; ``on_healthy(restarted)`` before `ready` turns true.
        self.recheck: Callable[[str], Awaitable[None]] | None = None
        self.on_healthy: Callable[[bool], Awaitable[object]] | None = None

    # -- public -------------------------------------------------------------
    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def pid(self) -> int | None:
        """The pid of vLLM's api_server (the reaper's child), if known."""
        if self._proc is None or self._proc.returncode is not None:
            return None
        try:
            with open(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children") as f:
                kids = f.read().split()
            return int(kids[0]) if kids else None
        except OSError:
            return None

    @property
    def loaded_adapters(self) -> dict[str, str]:
        return dict(self._adapters)

    async def start(self) -> None:
        """Start (or attach to) the server and wait until it answers `/health`.

        Managed: `EngineStartError` if the memory plan cannot fit, or if vLLM exits (or never
        turns healthy) before its first `/health`, with `serving.startup`'s diagnosis."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(keepalive_timeout=UPSTREAM_KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=None, connect=10),
        )
        if not self.managed:
            await self._wait_healthy()
            self._tasks.append(asyncio.create_task(self._watch_external(), name="vllm-watch"))
            return
        try:
            self.kv_cache_bytes = self._plan_memory()
        except MemoryFitError as e:
            self.last_error = f"the KV cache does not fit: {e}"
            raise EngineStartError(self.last_error) from e
        await self._spawn()
        try:
            await self._wait_healthy()
        except EngineError as e:
            self.last_error = await self._start_failure(e)
            raise EngineStartError(self.last_error) from e
        self._tasks.append(asyncio.create_task(self._supervise(), name="vllm-supervisor"))

    def _plan_memory(self) -> int | None:
        """The KV cache's size in bytes on the CPU (None on a GPU, where the share applies,
        when ``gpu_memory_utilization`` is set, or when ``VLLM_CPU_KVCACHE_SPACE`` is)."""
        s = self.settings
        assert s is not None
        if _has_cuda() or s.gpu_memory_utilization is not None:
            return None
        env_gib = kv_space_from_env()
        if env_gib:
            log.info("KV cache: VLLM_CPU_KVCACHE_SPACE=%s GiB (vLLM's own setting)", env_gib)
            return None
        shape = read_shape(s.model, s.dtype)
        plan = plan_kv_cache(shape, s.max_model_len or (shape and shape.context) or 2048,
                             read_memory(), s.kv_cache_gib)  # fmt: skip
        log.info("%s", plan.reason)
        return plan.bytes

    async def _start_failure(self, error: EngineError) -> str:
        """One line on why the first start failed; vLLM is stopped if it still runs."""
        proc = self._proc
        if proc is not None and proc.returncode is None:  # it never turned healthy: stop it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
        for t in self._tasks:  # let the output pump read vLLM's last lines
            if t.get_name() == "vllm-output":
                with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(t), 5)
        if proc is not None and proc.returncode is not None and not self._tail:
            return f"{error}; vLLM printed nothing"
        found = diagnose(self._tail, gpu=_has_cuda())
        if found.kind == "unknown" and "within" in str(error):
            return f"{error}; vLLM's last words: {found.detail}"
        return found.line()

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._proc is not None and self._proc.returncode is None:
            log.info("stopping vLLM (pid %s)", self._proc.pid)
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
            grace = self.settings.stop_grace_s if self.settings else 20.0
            try:
                await asyncio.wait_for(self._proc.wait(), grace + 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, 9)
                await self._proc.wait()
        self.ready = False
        if self._session is not None:
            await self._session.close()

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter under ``name`` (idempotent)."""
        async with self._load_lock:
            if self._adapters.get(name) == path:
                return
            await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
            self._adapters[name] = path
            log.info("adapter %s loaded from %s", name, path)

    async def unload_adapter(self, name: str) -> None:
        async with self._load_lock:
            if name not in self._adapters:
                return
            await self._post("/v1/unload_lora_adapter", {"lora_name": name})
            del self._adapters[name]

    async def generate(
        self,
        messages: list[dict[str, str]],
        *,
        model: str = BASE_NAME,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Generation:
        """One chat answer with its token count and wall time (greedy by default)."""
        body: dict[str, object] = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if seed is not None:
            body["seed"] = seed
        t0 = time.perf_counter()
        data = await self._call("/v1/chat/completions", body)
        seconds = time.perf_counter() - t0
        usage = data.get("usage") or {}
        return Generation(
            text=str(data["choices"][0]["message"]["content"] or ""),
            tokens=int(usage.get("completion_tokens") or 0),
            seconds=seconds,
            finish_reason=data["choices"][0].get("finish_reason"),
        )

    # -- internals ------------------------------------------------------------
    async def _call(self, path: str, body: dict[str, object]) -> dict[str, Any]:
        if self._session is None:
            raise EngineError("the model server has not been started")
        try:
            async with self._session.post(
                self.base_url + path, json=body, headers=self.headers
            ) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    raise EngineError(f"vLLM answered {resp.status}: {str(data)[:300]}")
        except aiohttp.ClientError as e:
            raise EngineError(f"vLLM is unreachable: {e}") from e
        return dict(data)

    async def _post(self, path: str, body: dict[str, str]) -> None:
        assert self._session is not None
        try:
            async with self._session.post(
                self.base_url + path, json=body, headers=self.headers
            ) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise AdapterLoadError(f"vLLM refused {path} ({resp.status}): {text[:500]}")
        except aiohttp.ClientError as e:
            raise EngineError(f"vLLM is unreachable: {e}") from e

    async def _healthy(self) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(
                self.base_url + "/health", timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _spawn(self) -> None:
        assert self.settings is not None
        cmd = vllm_command(
            self.settings,
            port=self.port,
            api_key=self.api_key or "",
            kv_cache_bytes=self.kv_cache_bytes,
        )
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **self.settings.env}
        if self.settings.hub_offline:
            env.setdefault("HF_HUB_OFFLINE", "1")
            env.setdefault("TRANSFORMERS_OFFLINE", "1")
        reaper = [
            sys.executable,
            "-m",
            "serving._reaper",
            str(os.getpid()),
            str(self.settings.stop_grace_s),
            "--",
            *cmd,
        ]
        log.info(
            "starting vLLM on 127.0.0.1:%d: %s",
            self.port,
            " ".join(a for a in cmd if a != self.api_key),
        )
        self._proc = await asyncio.create_subprocess_exec(
            *reaper,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self.started_at = time.monotonic()
        self._tail.clear()
        self._tasks.append(asyncio.create_task(self._pump_output(self._proc), name="vllm-output"))

    async def _pump_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._tail.append(line)
                vllm_log.info("%s", line)

    async def _wait_healthy(self, *, restarted: bool = False) -> None:
        timeout = self.settings.startup_timeout_s if self.settings else 300.0
        t0 = time.monotonic()
        next_note = t0 + 5
        while True:
            if await self._healthy():
                break
            if self._proc is not None and self._proc.returncode is not None:
                raise EngineError(
                    f"vLLM exited during start-up with status {self._proc.returncode}"
                )
            now = time.monotonic()
            if now - t0 > timeout:
                raise EngineError(f"vLLM did not become healthy within {timeout:.0f} s")
            if now >= next_note:
                log.info("waiting for vLLM to load the model: %.0f s", now - t0)
                next_note = now + 5
            await asyncio.sleep(0.25)
        log.info("vLLM ready in %.1f s", time.monotonic() - t0)
        self.last_error = None
        # Re-load the adapters a restarted server has forgotten, if they still pass the check.
        adapters, self._adapters = self._adapters, {}
        for name, path in adapters.items():
            try:
                if self.recheck is not None:
                    await self.recheck(name)
                await self.load_adapter(name, path)
            except Exception as e:  # refused by the check, or by vLLM
                log.error("adapter %s is not loaded again after the restart: %s", name, e)
        if self.on_healthy is not None:
            try:
                await self.on_healthy(restarted)
            except Exception:
                log.exception("settling the adapters after vLLM (re)started failed")
        self.ready = True

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            self.ready = False
            self.restarts += 1
            ran = time.monotonic() - (self.started_at or 0)
            if ran > 120:
                backoff = 1.0
            self.last_error = f"vLLM exited with status {code}; restarting"
            log.error("vLLM exited with status %s; restarting in %.0f s", code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)
            try:
                await self._spawn()
                await self._wait_healthy(restarted=True)
            except EngineError as e:
                found = diagnose(self._tail, gpu=_has_cuda())
                self.last_error = f"restart failed: {e}: {found.line()}"
                log.error("vLLM %s", self.last_error)

    async def _watch_external(self) -> None:
        while not self._stopping:
            healthy = await self._healthy()
            if healthy and not self.ready:
                log.info("external vLLM at %s is healthy again", self.base_url)
            elif not healthy and self.ready:
                log.error("external vLLM at %s stopped answering", self.base_url)
            self.ready = healthy
            await asyncio.sleep(1.0 if healthy else 0.5)
