"""Gateway overhead: the same vLLM server, called directly, through adaptd, and through LiteLLM.

One run starts ONE vLLM server (CPU build here) for the chosen model and puts in front of it
the adaptd gateway (`adaptd serve --vllm-url`), LiteLLM's proxy (installed into its own venv
under `.bench/`; left out, with the reason recorded, if it does not install or start) and a
bare reference proxy (aiohttp in and out, nothing else: what any Python hop costs on this
machine at this moment). Then it measures:

* throughput: `--requests` chat completions at `--concurrency`, `max_tokens=32`,
  `temperature=0`, `ignore_eos=true` (every answer exactly 32 tokens; checked per target),
  through each target in interleaved rounds (A, B, C, then B, C, A, ...: drift hits all
  alike); output tokens/s, latency percentiles, errors, and the CPU time each hop burns.
  The median round (by tokens/s) of each target is reported.
* added latency: `--pairs` sequential requests with `max_tokens=1`, for each index one per
  target, in an order that rotates with the index. The median of the per-pair differences
  (gateway - direct), with a bootstrap 95% CI: pairing removes most of vLLM's own noise.

All targets get the same prompts; every request carries its own vLLM `cache_salt`, so none
rides on the prefix cache another filled (same token counts, no cache hits). Both `ignore_eos`
and `cache_salt` are probed first: they must reach vLLM through every gateway.

    .venv/bin/python benchmarks/gateway_overhead.py [--model tiny|smollm2|PATH]
        [--requests 200] [--concurrency 16] [--rounds 3] [--pairs 300]
        [--no-litellm] [--no-bare] [--out docs/results/gateway_overhead.json]

Prints tables and writes every figure, the machine (cores, load before/after, the busiest
other processes) and the versions to `--out`. Every process it starts runs in its own process
group and is stopped on exit, on Ctrl-C and on SIGTERM. Logs: `.bench/logs/`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
LOGS = BENCH / "logs"

# LiteLLM 1.82.7/1.82.8 (March 2026) and a later 1.107.0 were published with credential
# stealers; pin a release that predates both rather than take whatever is newest.
LITELLM_SPEC = "litellm[proxy]==1.82.6"
LITELLM_INSTALL_TIMEOUT_S = 300

MAX_TOKENS = 32
# The targets: tokens/s ratio (>=), added median ms (<=), ours / LiteLLM's added (<=).
TARGETS = {"tokens_per_s": 0.98, "added_ms": 1.0, "vs_litellm": 0.25}

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Why is the sky blue?",
    "Give me a short tip for learning a language.",
    "What do bees make?",
    "Explain what a computer program is.",
    "How many legs does a spider have?",
    "What is two plus two?",
    "Write one sentence about the sea.",
    "What is the boiling point of water?",
    "Suggest a name for a small cat.",
    "What does a farmer grow in spring?",
    "Describe a mountain in a few words.",
    "Why do people read books?",
    "What is the largest planet?",
    "Tell me something about trains.",
]


# -- processes -----------------------------------------------------------------------------------
class Processes:
    """The children this script starts, each in its own process group, stopped in reverse order."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, cmd: Sequence[str], *, env: dict[str, str], cwd: Path = ROOT
    ) -> subprocess.Popen[bytes]:
        LOGS.mkdir(parents=True, exist_ok=True)
        with open(LOGS / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                list(cmd),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: we can stop it and its children
            )
        self.children.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _name, proc in reversed(self.children):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for _name, proc in reversed(self.children):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):  # stragglers in the group, if any
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.children.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (all held open together while choosing)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def log_tail(name: str, lines: int = 25) -> str:
    path = LOGS / f"{name}.log"
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], name: str, timeout_s: float) -> float:
    """Poll `url` until it answers 200; return the seconds it took. Fail if `proc` exits."""
    import urllib.error
    import urllib.request

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_tail(name)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} not ready at {url} after {timeout_s:.0f} s:\n{log_tail(name)}")


def tree_cpu_s(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes and all their descendants, now."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
        except psutil.Error:
            continue
    return total


# -- the model and the servers ------------------------------------------------------------------
def get_model(spec: str) -> tuple[str, Path]:
    """`tiny` (built in code), `smollm2` (converted from the GGUF shipped on PyPI) or a folder."""
    if spec == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tinymodel import build_tiny_model

        return "tiny", build_tiny_model(BENCH / "models" / "tiny")
    if spec == "smollm2":
        sys.path.insert(0, str(ROOT))
        from serving.models import ensure_default_model

        return "SmolLM2-135M-Instruct", ensure_default_model(BENCH / "models")
    path = Path(spec)
    if not path.is_dir():
        raise SystemExit(f"--model {spec!r}: not `tiny`, `smollm2` or a model folder")
    return path.name, path


def start_vllm(procs: Processes, model: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "base",
        "--host", "127.0.0.1", "--port", str(port),
        "--gpu-memory-utilization", "0.12", "--max-model-len", "1024",
        "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
    ]  # fmt: skip
    return procs.start("vllm", cmd, env=env)


def start_adaptd(
    procs: Processes, vllm_port: int, port: int, data_dir: Path
) -> subprocess.Popen[bytes]:
    # The bench's own ADAPTD_* settings would change what is measured: drop them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTD_")}
    env["ADAPTD_CONFIG"] = str(data_dir / "none.toml")  # no adaptd.toml from the cwd either
    cmd = [
        sys.executable, "-m", "daemon.cli", "serve",
        "--vllm-url", f"http://127.0.0.1:{vllm_port}",
        "--data-dir", str(data_dir), "--port", str(port),
    ]  # fmt: skip
    return procs.start("adaptd", cmd, env=env)


@dataclass
class LiteLLMSetup:
    available: bool
    reason: str | None = None
    version: str | None = None
    install_s: float | None = None  # None: an earlier run's install was reused
    spec: str = LITELLM_SPEC


def ensure_litellm(venv: Path) -> LiteLLMSetup:
    """Install LiteLLM's proxy into its own venv (time-boxed); reuse a complete one."""
    exe, py = venv / "bin" / "litellm", venv / "bin" / "python"
    t0, install_s = time.monotonic(), None
    if not exe.is_file():
        python3 = shutil.which("python3") or sys.executable
        try:
            subprocess.run([python3, "-m", "venv", str(venv)], check=True, capture_output=True)
            subprocess.run(
                [str(py), "-m", "pip", "install", "-q", LITELLM_SPEC],
                check=True,
                capture_output=True,
                timeout=LITELLM_INSTALL_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return LiteLLMSetup(
                False, f"pip install did not finish in {LITELLM_INSTALL_TIMEOUT_S}s"
            )
        except subprocess.CalledProcessError as e:
            err = (e.stderr or b"").decode(errors="replace").strip().splitlines()
            return LiteLLMSetup(False, f"install failed: {' | '.join(err[-3:])}")
        install_s = round(time.monotonic() - t0, 1)
    try:
        version = subprocess.run(
            [str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (subprocess.CalledProcessError, OSError) as e:
        return LiteLLMSetup(False, f"installed but unusable: {e}")
    return LiteLLMSetup(True, version=version, install_s=install_s)


# The thinnest Python hop: aiohttp.web in, aiohttp client out, uvloop, no parsing, no logging.
# Not a product: it measures what any Python proxy costs on this machine at this moment.
BARE_PROXY = """
import sys
import aiohttp
import uvloop
from aiohttp import web

upstream, port = sys.argv[1], int(sys.argv[2])


async def make_app() -> web.Application:
    app = web.Application()
    session: list[aiohttp.ClientSession] = []

    async def open_session(app: web.Application) -> None:
        session.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))

    async def chat(request: web.Request) -> web.Response:
        headers = {"Content-Type": "application/json"}
        async with session[0].post(upstream, data=await request.read(), headers=headers) as r:
            body = await r.read()
        return web.Response(body=body, status=r.status, content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.on_startup.append(open_session)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    return app


web.run_app(make_app(), host="127.0.0.1", port=port, access_log=None,
            loop=uvloop.new_event_loop(), print=None)
"""


def start_bare(
    procs: Processes, vllm_port: int, port: int, workdir: Path
) -> subprocess.Popen[bytes]:
    script = workdir / "bare_proxy.py"
    script.write_text(BARE_PROXY)
    upstream = f"http://127.0.0.1:{vllm_port}/v1/chat/completions"
    return procs.start(
        "bare", [sys.executable, str(script), upstream, str(port)], env=dict(os.environ)
    )


def start_litellm(
    procs: Processes, venv: Path, vllm_port: int, port: int, workdir: Path
) -> subprocess.Popen[bytes]:
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: base\n"
        "    litellm_params:\n"
        "      model: hosted_vllm/base\n"
        f"      api_base: http://127.0.0.1:{vllm_port}/v1\n"
        "      api_key: none\n"
    )
    # A bare environment: no keys or callbacks inherited, the bundled model-cost map instead
    # of a download, no telemetry, error-level logs (LiteLLM's own production advice).
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "NO_PROXY": "*",
    }
    cmd = [
        str(venv / "bin" / "litellm"), "--config", str(config),
        "--host", "127.0.0.1", "--port", str(port), "--telemetry", "False",
    ]  # fmt: skip
    return procs.start("litellm", cmd, env=env, cwd=workdir)


# -- the load generator ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    name: str  # direct | adaptd | litellm | bare
    url: str  # the chat completions URL
    model: str  # the `model` it expects
    pids: tuple[int, ...] = ()  # the hop's own processes (its CPU time is its cost)


@dataclass
class Reply:
    latency_s: float
    completion_tokens: int
    error: str | None = None


def chat_body(target: Target, prompt: str, max_tokens: int, salt: str) -> bytes:
    """One chat request. Every target gets the same prompts (so the same token counts); the
    `cache_salt` (vLLM's, unique per request) keeps any of them from reusing another's
    prefix cache. Both it and `ignore_eos` must pass through the gateways: probed."""
    return orjson.dumps(
        {
            "model": target.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,  # every answer is exactly max_tokens long
            "cache_salt": f"{target.name}-{salt}",
        }
    )


def prompt(tag: str, i: int) -> str:
    return f"[{tag}] {QUESTIONS[i % len(QUESTIONS)]}"


async def send(session: aiohttp.ClientSession, target: Target, body: bytes) -> Reply:
    t0 = time.perf_counter()
    try:
        async with session.post(
            target.url, data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            raw = await resp.read()
        latency = time.perf_counter() - t0
        if resp.status != 200:
            return Reply(latency, 0, f"{resp.status}: {raw[:200].decode(errors='replace')}")
        usage = orjson.loads(raw).get("usage") or {}
        return Reply(latency, int(usage.get("completion_tokens") or 0))
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as e:
        return Reply(time.perf_counter() - t0, 0, f"{type(e).__name__}: {e}")


@dataclass
class RunStats:
    target: str
    round: int
    requests: int
    wall_s: float
    completion_tokens: int
    tokens_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    short_answers: int  # answers with fewer than max_tokens tokens: ignore_eos did not reach vLLM
    # The hop's own CPU ms per request, less what it burns when idle (health polls, timers);
    # None for direct. `_raw` is without that correction.
    hop_cpu_ms_per_request: float | None
    hop_cpu_ms_per_request_raw: float | None
    vllm_cpu_s: float
    loadgen_cpu_s: float
    first_error: str | None = None


def loadgen_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def throughput_run(
    session: aiohttp.ClientSession,
    target: Target,
    *,
    round_: int,
    tag: str,
    requests: int,
    concurrency: int,
    vllm_pids: tuple[int, ...],
    idle_cpu: float = 0.0,
) -> RunStats:
    """`requests` chats, `concurrency` in flight at a time, through `target`."""
    bodies = iter(
        [
            chat_body(target, prompt(f"{tag}{i:04d}", i), MAX_TOKENS, f"{tag}{i}")
            for i in range(requests)
        ]
    )
    replies: list[Reply] = []

    async def worker() -> None:
        for body in bodies:  # one iterator shared by all workers: each body is sent once
            replies.append(await send(session, target, body))

    hop0, vllm0, gen0 = tree_cpu_s(target.pids), tree_cpu_s(vllm_pids), loadgen_cpu_s()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    hop1, vllm1, gen1 = tree_cpu_s(target.pids), tree_cpu_s(vllm_pids), loadgen_cpu_s()
    ok = [r for r in replies if r.error is None]
    lat = np.array([r.latency_s for r in ok]) * 1000 if ok else np.array([np.nan])
    tokens = sum(r.completion_tokens for r in ok)
    errors = [r.error for r in replies if r.error is not None]
    return RunStats(
        target=target.name,
        round=round_,
        requests=len(replies),
        wall_s=round(wall, 3),
        completion_tokens=tokens,
        tokens_per_s=round(tokens / wall, 2),
        p50_ms=round(float(np.percentile(lat, 50)), 1),
        p90_ms=round(float(np.percentile(lat, 90)), 1),
        p99_ms=round(float(np.percentile(lat, 99)), 1),
        errors=len(errors),
        short_answers=sum(1 for r in ok if r.completion_tokens < MAX_TOKENS),
        hop_cpu_ms_per_request=round((hop1 - hop0 - idle_cpu * wall) * 1000 / len(replies), 3)
        if target.pids
        else None,
        hop_cpu_ms_per_request_raw=round((hop1 - hop0) * 1000 / len(replies), 3)
        if target.pids
        else None,
        vllm_cpu_s=round(vllm1 - vllm0, 2),
        loadgen_cpu_s=round(gen1 - gen0, 2),
        first_error=errors[0] if errors else None,
    )


async def idle_cpu_rates(targets: Sequence[Target], seconds: float) -> dict[str, float]:
    """CPU seconds per second each hop burns with nothing in flight, measured side by side."""
    before = {t.name: tree_cpu_s(t.pids) for t in targets if t.pids}
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    wall = time.perf_counter() - t0
    return {t.name: (tree_cpu_s(t.pids) - before[t.name]) / wall for t in targets if t.pids}


async def paired_latency(
    session: aiohttp.ClientSession,
    targets: Sequence[Target],
    pairs: int,
    warmup: int,
    idle_cpu: dict[str, float],
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Sequential `max_tokens=1` requests, one per target per index, order rotating by index.

    Returns the latencies (ms) by target, and each hop's own CPU ms per request over the phase.
    """
    ms: dict[str, list[float]] = {t.name: [] for t in targets}
    cpu0 = {t.name: tree_cpu_s(t.pids) for t in targets if t.pids}
    t0 = time.perf_counter()
    for i in range(-warmup, pairs):
        k = i % len(targets)
        for target in [*targets[k:], *targets[:k]]:
            body = chat_body(target, prompt(f"L{i + warmup:05d}", i), 1, f"L{i + warmup}")
            reply = await send(session, target, body)
            if reply.error is not None:
                raise RuntimeError(f"{target.name} failed in the latency phase: {reply.error}")
            if i >= 0:
                ms[target.name].append(reply.latency_s * 1000)
    n, wall = pairs + warmup, time.perf_counter() - t0
    cpu = {
        t.name: round((tree_cpu_s(t.pids) - cpu0[t.name] - idle_cpu[t.name] * wall) * 1000 / n, 3)
        for t in targets
        if t.pids
    }
    return ms, cpu


@dataclass
class Added:
    """Added latency of one gateway over direct, from paired differences (ms)."""

    median_ms: float
    ci95_ms: tuple[float, float]
    mean_ms: float
    p10_ms: float
    p90_ms: float
    gateway_median_ms: float


def bootstrap_median(d: np.ndarray, rng: np.random.Generator, n: int = 5000) -> np.ndarray:
    return np.median(d[rng.integers(0, len(d), (n, len(d)))], axis=1)


def added_latency(
    ms: dict[str, list[float]], name: str, rng: np.random.Generator
) -> tuple[Added, np.ndarray]:
    d = np.array(ms[name]) - np.array(ms["direct"])
    boots = bootstrap_median(d, rng)
    added = Added(
        median_ms=round(float(np.median(d)), 3),
        ci95_ms=(
            round(float(np.percentile(boots, 2.5)), 3),
            round(float(np.percentile(boots, 97.5)), 3),
        ),
        mean_ms=round(float(d.mean()), 3),
        p10_ms=round(float(np.percentile(d, 10)), 3),
        p90_ms=round(float(np.percentile(d, 90)), 3),
        gateway_median_ms=round(float(np.median(ms[name])), 3),
    )
    return added, d


def ratio_ci(
    ours: np.ndarray, theirs: np.ndarray, rng: np.random.Generator, n: int = 5000
) -> tuple[float, float]:
    """Bootstrap 95% CI of median(ours) / median(theirs), resampling the same indices."""
    idx = rng.integers(0, len(ours), (n, len(ours)))
    r = np.median(ours[idx], axis=1) / np.median(theirs[idx], axis=1)
    return round(float(np.percentile(r, 2.5)), 4), round(float(np.percentile(r, 97.5)), 4)


async def probe(session: aiohttp.ClientSession, target: Target) -> dict[str, Any]:
    """Do vLLM's `ignore_eos` and `cache_salt` reach vLLM through this target?

    `ignore_eos`: every answer is exactly 32 tokens. `cache_salt`: a salt vLLM refuses (it
    contains '/') must come back as vLLM's 400, not be dropped on the way (200).
    """
    replies = [
        await send(session, target, chat_body(target, prompt(f"P{i}", i), 32, f"P{i}"))
        for i in range(2)
    ]
    errors = [r.error for r in replies if r.error]
    tokens = [r.completion_tokens for r in replies]
    bad_salt = await send(session, target, chat_body(target, prompt("P", 0), 1, "not/valid"))
    return {
        "ignore_eos_passes": not errors and all(t == MAX_TOKENS for t in tokens),
        "tokens": tokens,
        "cache_salt_passes": (bad_salt.error or "").startswith("400"),
        "error": errors[0] if errors else None,
    }


async def measure(
    targets: list[Target], vllm_pids: tuple[int, ...], args: argparse.Namespace
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=120)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        probes = {t.name: await probe(session, t) for t in targets}
        say(f"pass-through probes: {probes}")
        for t in targets:  # warm-up: connections, lazy imports, caches; not recorded
            await throughput_run(
                session,
                t,
                round_=-1,
                tag="W",
                requests=args.concurrency,
                concurrency=args.concurrency,
                vllm_pids=vllm_pids,
            )
        idle = await idle_cpu_rates(targets, seconds=10)
        say("idle CPU ms/s: " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in idle.items()))
        runs: list[RunStats] = []
        loads: list[float] = []
        for r in range(args.rounds):
            k = r % len(targets)
            for t in [*targets[k:], *targets[:k]]:
                stats = await throughput_run(
                    session,
                    t,
                    round_=r,
                    tag=f"T{r}-",
                    requests=args.requests,
                    concurrency=args.concurrency,
                    vllm_pids=vllm_pids,
                    idle_cpu=idle.get(t.name, 0.0),
                )
                runs.append(stats)
                loads.append(os.getloadavg()[0])
                say(
                    f"round {r} {t.name:7s} {stats.tokens_per_s:8.1f} tok/s  "
                    f"p50 {stats.p50_ms:7.1f} ms  errors {stats.errors}  "
                    f"short {stats.short_answers}  hop cpu/req {stats.hop_cpu_ms_per_request}"
                )
        say(f"latency phase: {args.pairs} paired sequential requests per target")
        ms, cpu = await paired_latency(session, targets, args.pairs, 10, idle)
        loads.append(os.getloadavg()[0])
    return {"probes": probes, "runs": runs, "latency_ms": ms, "latency_hop_cpu_ms": cpu,
            "idle_cpu_ms_per_s": {k: round(v * 1000, 2) for k, v in idle.items()},
            "load1_during": loads}  # fmt: skip


# -- reporting ---------------------------------------------------------------------------------
def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def busy_processes(exclude: set[int], sample_s: float = 1.0, top: int = 6) -> list[dict[str, Any]]:
    """The processes using the most CPU over `sample_s`, other than ours."""
    procs = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.pid not in exclude]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(sample_s)
    rows = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            pct = p.cpu_percent(None)
            if pct >= 5:
                cmd = " ".join(p.info["cmdline"] or [p.name()])[:100]
                rows.append({"pid": p.pid, "cpu_percent": round(pct, 1), "cmd": cmd})
    return sorted(rows, key=lambda r: -r["cpu_percent"])[:top]


def our_pids(procs: Processes) -> set[int]:
    pids = {os.getpid()}
    for _name, proc in procs.children:
        with contextlib.suppress(psutil.Error):
            pids |= {proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))}
    return pids


def machine() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions(litellm: LiteLLMSetup) -> dict[str, Any]:
    def dist(*names: str) -> str | None:
        for n in names:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return f"{n} {importlib.metadata.version(n)}"
        return None

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {
        "vllm": dist("vllm-cpu", "vllm"),
        "adaptd": dist("adaptd"),
        "adaptd_commit": git("rev-parse", "--short", "HEAD"),
        # Uncommitted changes in what this measures (the served path), if any.
        "adaptd_uncommitted": git(
            "status", "--porcelain", "serving", "daemon", "feedback"
        ).splitlines(),
        "litellm": litellm.version,
        "aiohttp": dist("aiohttp"),
        "fastapi": dist("fastapi"),
        "uvicorn": dist("uvicorn"),
    }


def median_round(runs: list[RunStats], target: str) -> RunStats:
    """The round with the median tokens/s (lower middle for an even count)."""
    mine = sorted((r for r in runs if r.target == target), key=lambda r: r.tokens_per_s)
    return mine[(len(mine) - 1) // 2]


def check(target: str, value: float | None, ok: bool | None, note: str = "") -> dict[str, Any]:
    return {"target": target, "value": value, "pass": ok, **({"note": note} if note else {})}


def summarize(raw: dict[str, Any], names: list[str]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    runs: list[RunStats] = raw["runs"]
    med = {n: median_round(runs, n) for n in names}
    direct_tps = med["direct"].tokens_per_s
    throughput = {
        n: {
            "median_round": asdict(med[n]),
            "rounds": [asdict(r) for r in runs if r.target == n],
            "tokens_per_s_vs_direct": round(med[n].tokens_per_s / direct_tps, 4),
        }
        for n in names
    }
    # The same ratio per round (each gateway round against the direct round beside it).
    for n in names[1:]:
        per = [
            g.tokens_per_s / d.tokens_per_s
            for g, d in zip(
                [r for r in runs if r.target == n],
                [r for r in runs if r.target == "direct"],
                strict=True,
            )
        ]
        throughput[n]["per_round_ratios"] = [round(x, 4) for x in per]
    ms = raw["latency_ms"]
    latency: dict[str, Any] = {
        "direct": {"median_ms": round(float(np.median(ms["direct"])), 3)},
        "pairs": len(ms["direct"]),
    }
    diffs: dict[str, np.ndarray] = {}
    for n in names[1:]:
        added, diffs[n] = added_latency(ms, n, rng)
        latency[n] = {**asdict(added), "hop_cpu_ms_per_request": raw["latency_hop_cpu_ms"][n]}
    if "bare" in names:  # what adaptd adds over the thinnest possible Python hop
        d = diffs["adaptd"] - diffs["bare"]
        boots = bootstrap_median(d, rng)
        latency["adaptd_minus_bare"] = {
            "median_ms": round(float(np.median(d)), 3),
            "ci95_ms": (round(float(np.percentile(boots, 2.5)), 3),
                        round(float(np.percentile(boots, 97.5)), 3)),
        }  # fmt: skip
    ratios: dict[str, Any] = {
        "adaptd_tokens_per_s_vs_direct": throughput["adaptd"]["tokens_per_s_vs_direct"],
        "adaptd_added_median_ms": latency["adaptd"]["median_ms"],
    }
    ours_tps, ours_ms = ratios["adaptd_tokens_per_s_vs_direct"], ratios["adaptd_added_median_ms"]
    checks = [
        check("adaptd tokens/s >= 0.98 x direct", ours_tps, ours_tps >= TARGETS["tokens_per_s"]),
        check("adaptd added median latency <= 1 ms", ours_ms, ours_ms <= TARGETS["added_ms"]),
    ]
    name = "adaptd added latency <= 0.25 x LiteLLM's"
    if "litellm" in names:
        theirs = latency["litellm"]["median_ms"]
        ratios["litellm_tokens_per_s_vs_direct"] = throughput["litellm"]["tokens_per_s_vs_direct"]
        ratios["litellm_added_median_ms"] = theirs
        value = round(ours_ms / theirs, 4) if theirs > 0 else None
        ratios["ours_over_litellm_added"] = value
        ratios["ours_over_litellm_added_ci95"] = ratio_ci(diffs["adaptd"], diffs["litellm"], rng)
        checks.append(check(name, value, value is not None and value <= TARGETS["vs_litellm"]))
    else:
        checks.append(check(name, None, None, "LiteLLM not available in this run"))
    return {"throughput": throughput, "added_latency": latency, "ratios": ratios, "checks": checks}


def print_tables(result: dict[str, Any], names: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    s = result["settings"]
    t = Table(
        title=f"Throughput: {result['model']['name']}, {s['requests']} chats at "
        f"concurrency {s['concurrency']}, {MAX_TOKENS} tokens each (median of "
        f"{s['rounds']} rounds)"
    )
    for col in [
        "target",
        "tokens/s",
        "x direct",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "errors",
        "short",
        "hop CPU ms/req",
    ]:
        t.add_column(col, justify="left" if col == "target" else "right")
    for n in names:
        th = result["throughput"][n]
        m = th["median_round"]
        cpu = m["hop_cpu_ms_per_request"]
        t.add_row(
            n,
            f"{m['tokens_per_s']:.1f}",
            f"{th['tokens_per_s_vs_direct']:.3f}",
            f"{m['p50_ms']:.0f}",
            f"{m['p90_ms']:.0f}",
            f"{m['p99_ms']:.0f}",
            str(m["errors"]),
            str(m["short_answers"]),
            "-" if cpu is None else f"{cpu:.2f}",
        )
    console.print(t)
    lat = result["added_latency"]
    t = Table(title=f"Added latency: {lat['pairs']} paired sequential requests, max_tokens=1")
    cols = ["target", "median ms", "added median ms", "95% CI", "added mean", "added p90",
            "hop CPU ms/req"]  # fmt: skip
    for col in cols:
        t.add_column(col, justify="left" if col == "target" else "right")
    t.add_row("direct", f"{lat['direct']['median_ms']:.2f}", "-", "-", "-", "-", "-")
    for n in names[1:]:
        a = lat[n]
        t.add_row(
            n,
            f"{a['gateway_median_ms']:.2f}",
            f"{a['median_ms']:.3f}",
            f"[{a['ci95_ms'][0]:.3f}, {a['ci95_ms'][1]:.3f}]",
            f"{a['mean_ms']:.3f}",
            f"{a['p90_ms']:.3f}",
            f"{a['hop_cpu_ms_per_request']:.2f}",
        )
    console.print(t)
    t = Table(title="Targets")
    for col in ["target", "value", "result"]:
        t.add_column(col)
    for c in result["checks"]:
        verdict = {True: "PASS", False: "MISS", None: "not measured"}[c["pass"]]
        t.add_row(c["target"], "-" if c["value"] is None else str(c["value"]), verdict)
    console.print(t)


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny, smollm2 or a model folder")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds per target (>= 2)")
    p.add_argument("--pairs", type=int, default=300, help="paired requests, latency phase")
    p.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out")
    p.add_argument("--no-bare", action="store_true", help="leave the bare reference proxy out")
    p.add_argument("--out", default="docs/results/gateway_overhead.json")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2")
    return args


def raise_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through `with Processes()`, which cleans up

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    BENCH.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="gateway-", dir=BENCH))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_on_sigterm()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = os.getloadavg()
    others_before = busy_processes({os.getpid()})
    say(f"load average {load_before}; busy processes: {others_before}")
    model_name, model_dir = get_model(args.model)
    say(f"model {model_name} at {model_dir}")
    litellm = (
        LiteLLMSetup(False, "skipped (--no-litellm)")
        if args.no_litellm
        else ensure_litellm(BENCH / "litellm-venv")
    )
    say(f"LiteLLM: {litellm}")
    with Processes() as procs, scratch_dir() as work:
        vllm_port, adaptd_port, litellm_port, bare_port = free_ports(4)
        vllm = start_vllm(procs, model_dir, vllm_port)
        adaptd = start_adaptd(procs, vllm_port, adaptd_port, work / "adaptd-data")
        litellm_proc = (
            start_litellm(procs, BENCH / "litellm-venv", vllm_port, litellm_port, work)
            if litellm.available
            else None
        )
        bare = None if args.no_bare else start_bare(procs, vllm_port, bare_port, work)
        vllm_ready_s = wait_http_ok(f"http://127.0.0.1:{vllm_port}/health", vllm, "vllm", 900)
        say(f"vLLM ready in {vllm_ready_s:.0f} s")
        wait_http_ok(f"http://127.0.0.1:{adaptd_port}/readyz", adaptd, "adaptd", 120)
        chat = "/v1/chat/completions"
        targets = [
            Target("direct", f"http://127.0.0.1:{vllm_port}{chat}", "base"),
            Target("adaptd", f"http://127.0.0.1:{adaptd_port}{chat}", "adaptd", (adaptd.pid,)),
        ]
        if litellm_proc is not None:
            try:
                url = f"http://127.0.0.1:{litellm_port}/health/liveliness"
                wait_http_ok(url, litellm_proc, "litellm", 180)
                targets.append(
                    Target("litellm", f"http://127.0.0.1:{litellm_port}{chat}", "base",
                           (litellm_proc.pid,))
                )  # fmt: skip
            except RuntimeError as e:
                litellm.available, litellm.reason = False, f"did not start: {e}"
                say(f"LiteLLM: {litellm.reason}")
        if bare is not None:
            wait_http_ok(f"http://127.0.0.1:{bare_port}/health", bare, "bare", 60)
            targets.append(
                Target("bare", f"http://127.0.0.1:{bare_port}{chat}", "base", (bare.pid,))
            )
        names = [t.name for t in targets]
        raw = asyncio.run(measure(targets, (vllm.pid,), args))
        others_after = busy_processes(our_pids(procs))
    load_after = os.getloadavg()
    result: dict[str, Any] = {
        "benchmark": "gateway_overhead",
        "started": started,
        "command": " ".join(
            [
                ".venv/bin/python",
                "benchmarks/gateway_overhead.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "model": {"name": model_name, "path": model_dir.name},
        "settings": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": MAX_TOKENS,
            "rounds": args.rounds,
            "pairs": args.pairs,
            "temperature": 0,
            "ignore_eos": True,
            "vllm_flags": "--gpu-memory-utilization 0.12 --max-model-len 1024 --enable-lora "
            "--max-lora-rank 16 --max-loras 2",
        },
        "machine": {
            **machine(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            "load1_during": [round(x, 2) for x in raw["load1_during"]],
            "busy_processes_before": others_before,
            "busy_processes_after": others_after,
        },
        "versions": versions(litellm),
        "litellm": asdict(litellm),
        "vllm_ready_s": round(vllm_ready_s, 1),
        "pass_through": raw["probes"],
        "idle_cpu_ms_per_s": raw["idle_cpu_ms_per_s"],
        **summarize(raw, names),
        "latency_samples_ms": {n: [round(x, 3) for x in v] for n, v in raw["latency_ms"].items()},
    }
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    print_tables(result, names)
    say(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
