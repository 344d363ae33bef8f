"""A client that hangs up on a stream: the gateway logs it "aborted" and drops vLLM's stream.

The upstream here is a small aiohttp server standing in for vLLM, so the timing that a busy
machine produces by chance (vLLM's answer already made, and buffered, when the gateway gets to
relay it) is produced on purpose. The real vLLM case is `tests/integration/test_faults.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from aiohttp import web
from fastapi import FastAPI

from serving.gateway import Exchange, Gateway, Limits, Target

N_CHUNKS = 2000


@dataclass
class Upstream:
    base_url: str
    ready: bool = True
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Vllm:
    """Answers a stream once ``release`` is set (at once when ``hold`` is off), in one write
    or token by token; records whether the gateway hung up before the end of it was read."""

    all_at_once: bool
    hold: bool = False
    received: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: asyncio.Event = field(default_factory=asyncio.Event)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.received.set()
        if self.hold:
            await self.release.wait()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
        events = [b"data: " + json.dumps(chunk).encode() + b"\n\n"] * N_CHUNKS
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": N_CHUNKS}}
        events += [b"data: " + json.dumps(usage).encode() + b"\n\n", b"data: [DONE]\n\n"]
        try:
            if self.all_at_once:
                await resp.write(b"".join(events))
            else:
                for e in events:
                    await resp.write(e)
                    await asyncio.sleep(0.002)
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.dropped.set()
            raise
        return resp


@contextlib.asynccontextmanager
async def serving(vllm: Vllm) -> AsyncIterator[tuple[int, list[Exchange]]]:
    up = web.Application()
    up.router.add_post("/v1/chat/completions", vllm.chat)
    runner = web.AppRunner(up)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    logged: list[Exchange] = []

    async def resolve(model: str, caller: Any) -> Target:
        return Target(upstream="base", version="base")

    @dataclass
    class Caller:
        label: str = "test"

    gw = Gateway(Upstream(f"http://127.0.0.1:{up_port}"), resolve, logged.append, limits=Limits())
    await gw.open()
    app = FastAPI()
    app.include_router(gw.router(lambda: Caller()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield port, logged
    finally:
        server.should_exit = True
        await task
        await gw.close()
        await runner.cleanup()


async def hang_up_after(port: int, seconds: float, when: asyncio.Event | None = None) -> bytes:
    """Send a streamed chat request, read for ``seconds`` (or until ``when`` is set), hang up;
    what arrived."""
    body = json.dumps({"model": "adaptd", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 8, "stream": True}).encode()  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: "
                 b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    got = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            if when is not None:
                await when.wait()
            else:
                while chunk := await reader.read(65536):
                    got += chunk
    writer.close()
    await writer.wait_closed()
    return got


async def logged_row(logged: list[Exchange]) -> Exchange:
    async with asyncio.timeout(10):
        while not logged:
            await asyncio.sleep(0.01)
    return logged[0]


@pytest.mark.parametrize("all_at_once", [True, False], ids=["buffered", "token-by-token"])
def test_a_client_gone_before_the_answer_began_is_aborted_and_vllm_dropped(
    all_at_once: bool,
) -> None:
    async def main() -> None:
        vllm = Vllm(all_at_once=all_at_once, hold=True)
        async with serving(vllm) as (port, logged):
            # gone once vLLM has the request and before its first byte, which comes after
            got = await hang_up_after(port, 10, when=vllm.received)
            await asyncio.sleep(0.2)
            vllm.release.set()
            row = await logged_row(logged)
            assert got == b""
            assert (row.status, row.completion_tokens) == ("aborted", None)
            if not all_at_once:  # a whole answer written at once is gone before anyone drops it
                async with asyncio.timeout(5):
                    await vllm.dropped.wait()

    asyncio.run(main())


def test_a_client_gone_mid_stream_is_aborted_and_vllm_dropped() -> None:
    async def main() -> None:
        vllm = Vllm(all_at_once=False)
        async with serving(vllm) as (port, logged):
            got = await hang_up_after(port, 0.3)  # some events arrived, far from all
            row = await logged_row(logged)
            assert b"data: " in got
            assert row.status == "aborted"
            assert 0 < len(row.output) < N_CHUNKS
            async with asyncio.timeout(5):
                await vllm.dropped.wait()

    asyncio.run(main())


def test_a_client_that_stays_gets_the_whole_answer_logged_ok() -> None:
    async def main() -> None:
        vllm = Vllm(all_at_once=True)
        async with serving(vllm) as (port, logged):
            got = await hang_up_after(port, 3.0)
            row = await logged_row(logged)
            assert got.count(b"data: ") == N_CHUNKS + 1  # the chunks and [DONE]
            assert (row.status, row.completion_tokens, len(row.output)) == (
                "ok",
                N_CHUNKS,
                N_CHUNKS,
            )
            assert not vllm.dropped.is_set()

    asyncio.run(main())
