"""Abusive HTTP clients on raw sockets, for the tests and `benchmarks/abuse.py`: each sends one
kind of abuse to a server and says what came back (status, seconds) without raising.
"""

from __future__ import annotations

import contextlib
import functools
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec

import orjson

CHAT_PATH = "/v1/chat/completions"
P = ParamSpec("P")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error_code(self) -> str:
        return str(orjson.loads(self.body)["error"]["code"])


@dataclass
class Outcome:
    kind: str
    status: int | None  # None: no answer (closed, reset or timed out; see `error`)
    seconds: float  # from asking to connect to the answer (or the close)
    code: str | None = None  # the error code of an OpenAI-shaped answer
    error: str = ""
    connect_s: float = 0.0  # of which connecting (the server's accept queue)


def read_answer(sock: socket.socket, buf: bytearray | None = None) -> Answer:
    """One HTTP/1.1 response (Content-Length, chunked, or 1xx) from ``sock``; ``buf`` keeps
    bytes read past it for the next call."""
    buf = buf if buf is not None else bytearray()

    def fill() -> None:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a whole answer")
        buf.extend(chunk)

    while b"\r\n\r\n" not in buf:
        fill()
    head, _, _ = bytes(buf).partition(b"\r\n\r\n")
    del buf[: len(head) + 4]
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if status < 200:
        body = b""
    elif "content-length" in headers:
        n = int(headers["content-length"])
        while len(buf) < n:
            fill()
        body = bytes(buf[:n])
        del buf[:n]
    else:
        body = b""
        while True:
            while b"\r\n" not in buf:
                fill()
            size_line, _, _ = bytes(buf).partition(b"\r\n")
            start = len(size_line) + 2
            size = int(size_line, 16)
            while len(buf) < start + size + 2:
                fill()
            body += bytes(buf[start : start + size])
            del buf[: start + size + 2]
            if size == 0:
                break
    return Answer(status, headers, body)


class _Conn:
    """A connection, timed from asking for it."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.t0 = time.monotonic()
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.connect_s = time.monotonic() - self.t0

    def __enter__(self) -> _Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def outcome(self, kind: str) -> Outcome:
        """Read the answer; say what it was and when it came."""
        try:
            answer = read_answer(self.sock)
        except (OSError, ValueError) as e:
            took = time.monotonic() - self.t0
            return Outcome(kind, None, took, error=type(e).__name__, connect_s=self.connect_s)
        took = time.monotonic() - self.t0
        code = None
        with contextlib.suppress(ValueError, KeyError, TypeError):
            code = answer.error_code()
        return Outcome(kind, answer.status, took, code, connect_s=self.connect_s)


def _head(path: str, auth: str | None, extra: bytes = b"") -> bytes:
    key = b"Authorization: Bearer %s\r\n" % auth.encode() if auth else b""
    return b"POST %s HTTP/1.1\r\nHost: adaptd\r\n%s%s" % (path.encode(), key, extra)


def _guarded(kind: str) -> Callable[[Callable[P, Outcome]], Callable[P, Outcome]]:
    """A connection that cannot be made is an outcome too (status None), not an exception."""

    def wrap(fn: Callable[P, Outcome]) -> Callable[P, Outcome]:
        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> Outcome:
            t0 = time.monotonic()
            try:
                return fn(*args, **kwargs)
            except OSError as e:
                return Outcome(kind, None, time.monotonic() - t0, error=f"{type(e).__name__}: {e}")

        return guarded

    return wrap


@_guarded("header flood")
def header_flood(host: str, port: int, headers: int = 10_000, timeout: float = 30) -> Outcome:
    """One request with ``headers`` small headers."""
    data = b"GET /healthz HTTP/1.1\r\nHost: adaptd\r\n"
    data += b"".join(b"X-Flood-%d: y\r\n" % i for i in range(headers)) + b"\r\n"
    with _Conn(host, port, timeout) as c:
        s = c.sock
        with contextlib.suppress(OSError):
            s.sendall(data)
        return c.outcome("header flood")


@_guarded("huge header")
def huge_header(host: str, port: int, size: int = 1_000_000, timeout: float = 30) -> Outcome:
    """One header whose value is ``size`` bytes."""
    data = b"GET /healthz HTTP/1.1\r\nHost: adaptd\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    with _Conn(host, port, timeout) as c:
        s = c.sock
        with contextlib.suppress(OSError):
            s.sendall(data)
        return c.outcome("huge header")


@_guarded("slowloris")
def slowloris(host: str, port: int, interval: float = 1.0, give_up: float = 120) -> Outcome:
    """A request head sent one byte per ``interval`` seconds, until the server answers."""
    data = _head(CHAT_PATH, None, b"X-Pad: " + b"a" * 100_000)
    with _Conn(host, port, give_up) as c:
        s = c.sock
        with contextlib.suppress(OSError):
            for i in range(len(data)):
                s.send(data[i : i + 1])
                if select.select([s], [], [], interval)[0] or time.monotonic() - c.t0 > give_up:
                    break
        return c.outcome("slowloris")


@_guarded("silent")
def silent(host: str, port: int, give_up: float = 120) -> Outcome:
    """A connection that sends nothing: how long until the server closes it."""
    with _Conn(host, port, give_up) as c:
        s = c.sock
        try:
            data = s.recv(1024)
        except OSError as e:
            return Outcome("silent", None, time.monotonic() - c.t0, error=type(e).__name__)
        return Outcome(
            "silent",
            None,
            time.monotonic() - c.t0,
            error="closed" if not data else "sent data",
            connect_s=c.connect_s,
        )


@_guarded("slow body")
def slow_body(
    host: str, port: int, auth: str | None, path: str = CHAT_PATH, give_up: float = 120
) -> Outcome:
    """A head announcing 1,000 bytes of body, then 10 of them, then nothing."""
    with _Conn(host, port, give_up) as c:
        s = c.sock
        s.sendall(
            _head(path, auth, b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        )
        s.sendall(b'{"model": ')
        return c.outcome("slow body")


@_guarded("huge body")
def huge_body(
    host: str,
    port: int,
    auth: str | None,
    size: int = 50_000_000,
    chunked: bool = False,
    path: str = CHAT_PATH,
    timeout: float = 60,
) -> Outcome:
    """A ``size``-byte body, announced by Content-Length or sent chunked (no length)."""
    framing = (
        b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"Content-Length: %d\r\n\r\n" % size
    )
    piece = b"a" * 65536
    if chunked:
        piece = b"%x\r\n%s\r\n" % (len(piece), piece)
    with _Conn(host, port, timeout) as c:
        s = c.sock
        with contextlib.suppress(OSError):
            s.sendall(_head(path, auth, b"Content-Type: application/json\r\n" + framing))
            for _ in range(size // 65536):
                s.sendall(piece)
                if select.select([s], [], [], 0)[0]:  # answered: stop sending
                    break
        return c.outcome("huge body (chunked)" if chunked else "huge body")
