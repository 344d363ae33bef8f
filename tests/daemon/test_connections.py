"""The connection limits of `daemon.connections.LimitedProtocol`, under a real uvicorn (uvloop,
httptools, as the daemon runs it) on a free port with a small ASGI app, spoken to with raw
sockets: header floods get a 431, slow clients a 408 (or, with nothing sent, a silent close),
the connection after the cap a 503, and keep-alive, pipelining and slow apps are untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from abusers import read_answer
from conftest import free_port
from fastapi import Request
from fastapi.responses import Response

from daemon.connections import ConnectionLimits, limited_protocol
from daemon.http import build_app
from daemon.metrics import Metrics

LIMITS = ConnectionLimits(
    max_header_bytes=8192,
    max_headers=20,
    header_timeout_s=0.5,
    body_timeout_s=0.5,
    max_connections=8,
    linger_s=1.0,
)
FAST_S = 2.0  # "at once" on a busy 2-core machine (it takes milliseconds when idle)
# The server's clock for a timeout starts at its last read, which can come a little before the
# test's own clock starts (seen: 0.4995 s measured for a 0.5 s timeout).
CLOCKS_S = 0.02
refusals: list[tuple[int, str]] = []


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """`/`: answers the body's length. `/slow`: answers after 1.2 s. `/late-read`: reads the
    body only after 1.2 s. `/stream`: three chunks 0.3 s apart."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/late-read":
        await asyncio.sleep(1.2)
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if path == "/slow":
        await asyncio.sleep(1.2)
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"a", b"b", b"c"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0.3)
        await send({"type": "http.response.body", "body": b""})
        return
    out = str(len(body)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(out)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": out})


@dataclass
class Running:
    port: int
    server: uvicorn.Server

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def open_connections(self) -> int:
        return len(self.server.server_state.connections)


@contextlib.contextmanager
def serving(asgi_app: Any) -> Iterator[Running]:
    """``asgi_app`` under uvicorn (uvloop, the limited httptools protocol) in a thread."""
    port = free_port()
    config = uvicorn.Config(
        asgi_app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http=limited_protocol(LIMITS, lambda status, code: refusals.append((status, code))),
        ws="none",
        lifespan="off",
        log_config=None,
        timeout_keep_alive=5,
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield Running(port, srv)
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    with serving(app) as running:
        yield running


@pytest.fixture(autouse=True)
def no_connections_left(server: Running) -> Iterator[None]:
    """Every test starts and ends with no open connection: nothing is held for ever."""
    wait_until(lambda: server.open_connections() == 0, 5.0)
    refusals.clear()
    yield
    assert wait_until(lambda: server.open_connections() == 0, 5.0), "connections left open"


def wait_until(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def request(path: str = "/", body: bytes = b"", extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path.encode(),
        len(body),
        extra,
        body,
    )


def send_ignoring_reset(sock: socket.socket, data: bytes) -> None:
    """Send what the server may stop reading half-way (it answered already)."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


# --------------------------------------------------------------------------- head limits

HEAD_FLOODS = [
    (
        "10,000 headers",
        b"GET / HTTP/1.1\r\nHost: t\r\n"
        + b"".join(b"X-%d: y\r\n" % i for i in range(10_000))
        + b"\r\n",
        "too_many_headers",
    ),
    ("21 headers", b"GET / HTTP/1.1\r\n" + b"X-a: b\r\n" * 21 + b"\r\n", "too_many_headers"),
    (
        "a 1 MB header value",
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
        "headers_too_large",
    ),
    (
        "a 100 KB URL",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
        "headers_too_large",
    ),
    (
        "headers just over the limit in one read",
        b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 8190 + b"\r\n\r\n",
        "headers_too_large",
    ),
]


@pytest.mark.parametrize(("case", "data", "code"), HEAD_FLOODS, ids=[c[0] for c in HEAD_FLOODS])
def test_a_head_over_the_limits_is_refused_with_431_at_once(
    server: Running, case: str, data: bytes, code: str
) -> None:
    with server.connect() as s:
        t0 = time.monotonic()
        send_ignoring_reset(s, data)
        answer = read_answer(s)
        took = time.monotonic() - t0
        assert answer.status == 431
        assert answer.headers["connection"] == "close"
        assert answer.error_code() == code
        assert took < FAST_S
        assert closed_by_peer(s, LIMITS.linger_s + 2)
    assert refusals == [(431, code)]


def test_a_head_just_under_the_limit_is_served(server: Running) -> None:
    with server.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 7000 + b"\r\n\r\n")
        assert read_answer(s).status == 200


def rss_mib() -> float:
    """The resident memory of this process (the server runs in it), now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_an_endless_header_is_cut_off_with_memory_bounded(server: Running) -> None:
    """Without the limit the server reads it all into one header value (83 MB in 8 s)."""
    before = peak = rss_mib()
    piece = b"a" * 65536
    with server.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Endless: ")
        sent, t0 = 0, time.monotonic()
        with contextlib.suppress(OSError):
            while sent < 64_000_000 and time.monotonic() - t0 < 10:
                s.sendall(piece)
                sent += len(piece)
                peak = max(peak, rss_mib())
        answer = read_answer(s)
    assert answer.status == 431 and answer.error_code() == "headers_too_large"
    assert peak - before < 32, f"the process grew {peak - before:.0f} MiB"


# --------------------------------------------------------------------------- slow clients


def test_headers_one_byte_at_a_time_get_408_after_the_header_timeout(server: Running) -> None:
    data = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100
    with server.connect() as s:
        t0 = time.monotonic()
        with contextlib.suppress(OSError):
            for i in range(len(data)):
                s.send(data[i : i + 1])
                if select.select([s], [], [], 0.05)[0]:  # the answer came
                    break
        took = time.monotonic() - t0
        answer = read_answer(s)
    assert answer.status == 408 and answer.error_code() == "request_timeout"
    assert LIMITS.header_timeout_s - CLOCKS_S <= took < LIMITS.header_timeout_s + FAST_S
    assert refusals == [(408, "request_timeout")]


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(server: Running) -> None:
    with server.connect() as s:
        t0 = time.monotonic()
        s.settimeout(5)
        assert s.recv(100) == b""
        took = time.monotonic() - t0
    assert LIMITS.header_timeout_s - CLOCKS_S <= took < LIMITS.header_timeout_s + FAST_S
    assert refusals == []


def test_many_silent_connections_are_all_closed(server: Running) -> None:
    socks = [server.connect() for _ in range(LIMITS.max_connections)]
    try:
        assert all(closed_by_peer(s, 3) for s in socks)
    finally:
        for s in socks:
            s.close()


def test_a_body_that_stops_gets_408_after_the_body_timeout(server: Running) -> None:
    with server.connect() as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        t0 = time.monotonic()
        answer = read_answer(s)
        took = time.monotonic() - t0
        assert closed_by_peer(s, LIMITS.linger_s + 2)
    assert answer.status == 408 and answer.error_code() == "request_timeout"
    assert LIMITS.body_timeout_s - CLOCKS_S <= took < LIMITS.body_timeout_s + FAST_S


def test_a_slow_but_steady_body_is_read_to_the_end(server: Running) -> None:
    """The body timeout is a pause between reads, not a deadline for the whole body."""
    body = b"y" * 12
    with server.connect() as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 12\r\n\r\n")
        for i in range(len(body)):  # 12 x 0.2 s: longer than the timeout, no pause as long
            time.sleep(0.2)
            s.sendall(body[i : i + 1])
        answer = read_answer(s)
    assert answer.status == 200 and answer.body == b"12"


def test_a_chunked_body_that_stops_gets_408(server: Running) -> None:
    with server.connect() as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        answer = read_answer(s)
    assert answer.status == 408


# --------------------------------------------------------------------------- the cap


def test_the_connection_over_the_cap_gets_503_and_the_next_after_is_served(
    server: Running,
) -> None:
    socks = [server.connect() for _ in range(LIMITS.max_connections)]
    try:
        assert wait_until(lambda: server.open_connections() == LIMITS.max_connections, 2)
        with server.connect() as extra:
            t0 = time.monotonic()
            answer = read_answer(extra)
            assert time.monotonic() - t0 < FAST_S
        assert answer.status == 503 and answer.error_code() == "too_many_connections"
        assert answer.headers["retry-after"] == "1"
        socks.pop().close()
        assert wait_until(lambda: server.open_connections() < LIMITS.max_connections, 2)
        with server.connect() as s:
            s.sendall(request(body=b"abc"))
            assert read_answer(s).status == 200
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------- normal traffic


def test_keep_alive_with_pauses_longer_than_both_timeouts(server: Running) -> None:
    """Between requests the connection belongs to uvicorn's keep-alive timer (5 s here)."""
    with server.connect() as s:
        for n in range(3):
            s.sendall(request(body=b"x" * n))
            answer = read_answer(s)
            assert answer.status == 200 and answer.body == str(n).encode()
            assert "connection" not in answer.headers
            time.sleep(0.8)


def test_pipelined_requests_are_answered_in_order(server: Running) -> None:
    bodies = [b"a" * n for n in (1, 200_000, 3, 0, 70_000)]
    with server.connect() as s:
        s.sendall(b"".join(request(body=b) for b in bodies))
        buf = bytearray()
        got = [read_answer(s, buf).body for _ in bodies]
    assert got == [str(len(b)).encode() for b in bodies]


def test_a_slow_app_keeps_its_connection(server: Running) -> None:
    """The app's own time (1.2 s, over both timeouts) is not the client's delay."""
    with server.connect() as s:
        s.sendall(request("/slow", b"q"))
        assert read_answer(s).status == 200
        s.sendall(request("/stream"))
        assert read_answer(s).body == b"abc"


def test_an_app_that_reads_late_is_not_blamed_on_the_client(server: Running) -> None:
    """A 1 MB body fills the buffers and the server stops reading until the app reads."""
    body = b"z" * 1_000_000
    with server.connect() as s:
        s.sendall(request("/late-read", body))
        answer = read_answer(s)
    assert answer.status == 200 and answer.body == b"1000000"


def test_a_pipelined_head_behind_a_slow_answer_is_not_timed_out(server: Running) -> None:
    with server.connect() as s:
        s.sendall(request("/slow") + b"GET / HTTP/1.1\r\nHost: t\r\n")
        buf = bytearray()
        assert read_answer(s, buf).status == 200
        s.sendall(b"\r\n")
        assert read_answer(s, buf).status == 200


def test_expect_100_continue_waits_for_the_app(server: Running) -> None:
    """The client sends its body only after "100 Continue", which the app asks for late."""
    with server.connect() as s:
        s.sendall(
            b"POST /late-read HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        buf = bytearray()
        interim = read_answer(s, buf)
        assert interim.status == 100
        s.sendall(b"abc")
        assert read_answer(s, buf).body == b"3"


def test_malformed_http_is_a_400_in_openai_shape(server: Running) -> None:
    with server.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: nope\r\n\r\n")
        answer = read_answer(s)
    assert answer.status == 400 and answer.error_code() == "invalid_http"


def test_a_body_cut_off_in_the_daemons_app_is_no_server_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The app's `request.body()` raises ClientDisconnect when the protocol cuts a slow body
    off: that is a 499 in the metrics, not a 500 logged with a traceback."""
    metrics = Metrics()

    async def ready() -> tuple[bool, str]:
        return True, "ok"

    fastapi_app = build_app(lifespan=None, metrics=metrics, max_body_bytes=65536, ready=ready)

    @fastapi_app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await request.body())

    with serving(fastapi_app) as running, running.connect() as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        assert read_answer(s).status == 408
        assert wait_until(lambda: b'status="499"' in metrics.render(), 2)
    assert b'status="500"' not in metrics.render()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
