"""uvicorn's HTTP protocol with the limits a listening port needs before the app runs.

uvicorn's httptools protocol caps nothing until a request reaches the app: 10,000 headers or
an endless header value are read into memory (83 MB of one header value in 8 s, measured), and
a client that sends one byte a second, or nothing at all, holds its connection for ever.
`LimitedProtocol` adds, per connection:

* the head (request line and headers): at most ``max_header_bytes`` and ``max_headers``, else
  431; it must arrive whole within ``header_timeout_s`` of its first byte (of the connection's
  opening for a first request), else 408. A connection that sends no byte in that time is
  closed without an answer (nginx does the same);
* the body: a pause of ``body_timeout_s`` between two reads is a 408 (nginx's
  ``client_body_timeout``). Pauses while the server itself stopped reading (flow control, a
  pipelined request waiting its turn) do not count, nor does the app's own time;
* at most ``max_connections`` open connections: the next one is answered 503 at once
  (nginx's ``worker_connections``, gunicorn's ``worker_connections``; uvicorn's own
  ``limit_concurrency`` also counts idle connections against *requests*, so 200 slow clients
  would turn normal traffic into 503s).

A refusal is written in OpenAI's error shape with ``Connection: close``; then the connection
is half-closed and what the client still sends is read and dropped for ``linger_s`` (nginx's
lingering close), so that the client reads the answer instead of a reset. uvicorn's own 400
for a malformed request goes the same way. Every refusal is counted through ``on_refuse``
(the daemon's ``adaptd_refused`` metric); only the connection cap logs, once in a while.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from daemon.http import error_body

log = logging.getLogger(__name__)
_LOG_EVERY_S = 10.0  # under a flood of connections, one warning per this many seconds


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 65_536
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 512
    linger_s: float = 2.0


class _Phase(Enum):
    WAIT = "wait"  # connection open, no byte of its first request yet
    HEAD = "head"  # request line and headers arriving
    BODY = "body"  # headers done, body arriving
    DONE = "done"  # request read; the app (or the keep-alive timer) has the connection


class _Refused(Exception):
    """Stops the parser after a refusal was written."""


class LimitedProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` with head, time and connection limits (see the module docstring)."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    on_refuse: ClassVar[tuple[Callable[[int, str], None], ...]] = ()  # (status, code)
    _last_warning: ClassVar[float] = float("-inf")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _Phase.WAIT
        self._since = 0.0  # when the head's deadline started
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._message = 0  # requests begun on this connection
        self._head_fields = 0  # headers of the head in progress
        self._head_parsed = 0  # bytes of its URL and headers, as the parser hands them over
        self._head_raw = 0  # bytes of the reads that came while it was already in progress

    # -- connection ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            now = time.monotonic()
            if now - LimitedProtocol._last_warning >= _LOG_EVERY_S:
                LimitedProtocol._last_warning = now
                log.warning(
                    "refusing connections: %d are open (limits.max_connections)",
                    len(self.connections) - 1,
                )
            self._refuse(
                503,
                "server_error",
                "too_many_connections",
                f"this server holds at most {self.limits.max_connections} connections; "
                "retry in a moment",
                extra=b"retry-after: 1\r\n",
            )
            return
        self._since = self._last_read = self.loop.time()
        self._arm(self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and drop
        self._unset_keepalive_if_required()
        self._last_read = self.loop.time()
        message, in_head = self._message, self._phase is _Phase.HEAD
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self._cancel_timer()
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if not self._refused:
                self.send_400_response("Invalid HTTP request received.")
            return
        # A head still incomplete after a read that came while it was already in progress:
        # the whole read is head (a read that began it may carry the end of an earlier
        # request, so it is left to the parser's count).
        if in_head and self._phase is _Phase.HEAD and self._message == message:
            self._head_raw += len(data)
            if self._head_raw > self.limits.max_header_bytes:
                self._refuse_head_size()

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn warns twice per request asking for an upgrade: a log flood for the asking.
        log.debug("ignored an Upgrade request from %s: no WebSocket routes", self.client)

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "invalid_request_error", "invalid_http", msg)

    # -- parser callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message += 1
        self._head_fields = self._head_parsed = self._head_raw = 0
        if self._phase is not _Phase.WAIT:  # a first request's deadline runs from the opening
            self._since = self.loop.time()
            self._arm(self.limits.header_timeout_s)
        self._phase = _Phase.HEAD

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += 1
        if self._head_fields > self.limits.max_headers:
            self._refuse(
                431,
                "invalid_request_error",
                "too_many_headers",
                f"the request has more than {self.limits.max_headers} headers",
            )
            raise _Refused
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._phase = _Phase.BODY
        self._arm(self.limits.body_timeout_s)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._phase = _Phase.DONE
        self._cancel_timer()

    # -- limits ------------------------------------------------------------------------------
    def _count_head(self, n: int) -> None:
        self._head_parsed += n
        if self._head_parsed > self.limits.max_header_bytes:
            self._refuse_head_size()
            raise _Refused

    def _refuse_head_size(self) -> None:
        self._refuse(
            431,
            "invalid_request_error",
            "headers_too_large",
            f"the request line and headers are over {self.limits.max_header_bytes} bytes",
        )

    def _arm(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._refused or self.transport.is_closing():
            return
        now = self.loop.time()
        if self._phase is _Phase.BODY:
            timeout, since = self.limits.body_timeout_s, self._last_read
        elif self._phase in (_Phase.WAIT, _Phase.HEAD):
            timeout, since = self.limits.header_timeout_s, self._since
        else:
            return
        if now < since + timeout:
            self._arm(since + timeout - now)
            return
        waiting_for_us = self.flow.read_paused or self._earlier_answer_pending()
        if self._phase is _Phase.BODY and self.cycle.waiting_for_100_continue:
            waiting_for_us = True  # the client waits for "100 Continue" before its body
        if waiting_for_us:
            # The server is not reading (or still answering an earlier request): not the
            # client's delay. Start the clock again.
            self._since = self._last_read = now
            self._arm(timeout)
            return
        if self._phase is _Phase.WAIT:
            self.transport.close()
        elif self._phase is _Phase.HEAD:
            self._refuse(
                408,
                "invalid_request_error",
                "request_timeout",
                f"the request's headers did not arrive within {timeout:g} s",
            )
        elif self.cycle.response_complete:
            self.transport.close()  # answered already; the rest of the body never came
        else:
            self._refuse(
                408,
                "invalid_request_error",
                "request_timeout",
                f"no part of the request's body arrived for {timeout:g} s",
            )

    def _earlier_answer_pending(self) -> bool:
        """Whether an answer to an earlier request on this connection is not finished."""
        if self._phase is _Phase.BODY:  # `cycle` is this request's; is it queued behind one?
            return any(cycle is self.cycle for cycle, _ in self.pipeline)
        return self.cycle is not None and not self.cycle.response_complete

    def _refuse(self, status: int, type_: str, code: str, message: str, extra: bytes = b"") -> None:
        """Answer ``status`` and close; an answer already under way is cut off instead."""
        if self._refused:
            return
        self._refused = True
        self._cancel_timer()
        log.debug("refused %s: %d %s", self.client, status, code)
        for report in self.on_refuse:
            report(status, code)
        if self.cycle is not None and not self.cycle.response_complete:
            earlier = self._earlier_answer_pending()
            # The app's later sends are dropped and its receive() says the client left.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
            if self.cycle.response_started or earlier or self._phase is not _Phase.BODY:
                # bytes of an answer (this one's, or an earlier request's) may be on the wire
                self.transport.close()
                return
        body = error_body(message, type_, code)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            extra,
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        # Lingering close: half-close, then drop what the client still sends for a while.
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = self.loop.call_later(self.limits.linger_s, self.transport.close)


def limited_protocol(
    limits: ConnectionLimits, on_refuse: Callable[[int, str], None] | None = None
) -> type[LimitedProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` that enforces ``limits`` and reports
    each refusal (status, code) to ``on_refuse``."""
    return type(
        "LimitedProtocol",
        (LimitedProtocol,),
        {"limits": limits, "on_refuse": (on_refuse,) if on_refuse else ()},
    )
