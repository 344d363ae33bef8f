"""Abusive clients against the session daemon (real `adaptd serve`, real vLLM), all at once and
while normal chat requests go on: each abuse gets its 4xx quickly and every normal request
gets its 200. The limits themselves are tested in detail in tests/daemon/test_connections.py
(the connection) and test_gateway_vllm.py (`max_tokens`, `n`, a 70 KB body); this module fills
in what only a whole daemon shows.

The session daemon runs with `limits.header_timeout_s` and `limits.body_timeout_s` at 5 s
(tests/conftest.py) and `limits.max_body_bytes` at 64 KiB. Times asserted are generous: the
machine may be a busy 2-core CPU.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest
from abusers import (
    Outcome,
    header_flood,
    huge_body,
    huge_header,
    silent,
    slow_body,
    slowloris,
)
from conftest import INFERENCE_KEY, RunningDaemon, daemon_env

pytestmark = pytest.mark.vllm

HOST = "127.0.0.1"
TIMEOUT_S = float(daemon_env()["ADAPTD_LIMITS__HEADER_TIMEOUT_S"])
MAX_TOKENS = int(daemon_env()["ADAPTD_LIMITS__MAX_TOKENS"])
CHAT = {"model": "adaptd", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
FAST_S = 10.0  # "at once", on a busy CPU
SLOWLORIS = 20


def json_abuse(client: httpx.Client, kind: str, body: dict[str, object]) -> Outcome:
    t0 = time.monotonic()
    r = client.post("/v1/chat/completions", json=body)
    code = r.json().get("error", {}).get("code") if r.status_code >= 400 else None
    return Outcome(kind, r.status_code, time.monotonic() - t0, code)


def refused_counts(client: httpx.Client) -> dict[tuple[str, str], float]:
    text = client.get("/metrics").text
    pattern = r'^adaptd_refused_total\{code="([^"]+)",status="(\d+)"\} ([0-9.e+]+)$'
    return {(s, c): float(v) for c, s, v in re.findall(pattern, text, re.M)}


def test_abuse_is_refused_while_normal_requests_are_served(
    daemon: RunningDaemon, client: httpx.Client
) -> None:
    port = daemon.port
    before = refused_counts(client)
    many_messages = [{"role": "user", "content": "x"}] * 600
    # (expected status, expected code or None, seconds it may take, the abuse)
    abuses: list[tuple[int | None, str | None, float, Callable[[], Outcome]]] = [
        (431, "too_many_headers", FAST_S, lambda: header_flood(HOST, port)),
        (431, "headers_too_large", FAST_S, lambda: huge_header(HOST, port)),
        (413, "request_too_large", FAST_S, lambda: huge_body(HOST, port, INFERENCE_KEY)),
        (413, "request_too_large", FAST_S,
         lambda: huge_body(HOST, port, INFERENCE_KEY, size=5_000_000, chunked=True)),
        (408, "request_timeout", TIMEOUT_S + FAST_S, lambda: slow_body(HOST, port, INFERENCE_KEY)),
        (400, "limit_exceeded", FAST_S, lambda: json_abuse(
            client, "600 messages", {**CHAT, "messages": many_messages})),
        (400, "limit_exceeded", FAST_S, lambda: json_abuse(
            client, "max_completion_tokens", {**CHAT, "max_completion_tokens": 10 * MAX_TOKENS})),
        (400, "limit_exceeded", FAST_S, lambda: json_abuse(client, "best_of", {**CHAT, "best_of": 99})),
    ]  # fmt: skip
    abuses += [
        (408, "request_timeout", TIMEOUT_S + FAST_S, lambda: slowloris(HOST, port, interval=0.5))
        for _ in range(SLOWLORIS)
    ]
    abuses += [(None, None, TIMEOUT_S + FAST_S, lambda: silent(HOST, port)) for _ in range(5)]

    normal: list[tuple[int, float]] = []
    with (
        ThreadPoolExecutor(max_workers=len(abuses)) as pool,
        httpx.Client(base_url=daemon.url, headers=client.headers, timeout=120) as c,
    ):
        futures: list[Future[Outcome]] = [pool.submit(fn) for *_, fn in abuses]
        t_end = time.monotonic() + TIMEOUT_S + 2  # normal traffic for as long as the slow ones
        while time.monotonic() < t_end or len(normal) < 4:
            t0 = time.monotonic()
            r = c.post("/v1/chat/completions", json={**CHAT, "messages": [
                {"role": "user", "content": f"Hello {len(normal)}"}]})  # fmt: skip
            normal.append((r.status_code, time.monotonic() - t0))
        outcomes = [f.result(timeout=120) for f in futures]

    assert all(status == 200 for status, _ in normal), normal
    for (status, code, within, _), got in zip(abuses, outcomes, strict=True):
        assert (got.status, got.code) == (status, code), got
        assert got.seconds < within, got
        if got.kind in ("slowloris", "slow body", "silent"):
            assert got.seconds >= TIMEOUT_S - 0.5, got  # not cut off before the timeout
        if got.kind == "silent":
            assert got.error == "closed", got  # by the server, without an answer
    assert client.get("/readyz").status_code == 200

    after = refused_counts(client)
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert grew.get(("431", "too_many_headers"), 0) >= 1
    assert grew.get(("431", "headers_too_large"), 0) >= 1
    assert grew.get(("408", "request_timeout"), 0) >= SLOWLORIS + 1
