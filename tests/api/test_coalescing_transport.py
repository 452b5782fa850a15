"""The server's writes to a connection during one step of the event loop leave in one system call
(``comfyfleet.http.coalesce``), in order, and nothing gathered is lost when the connection closes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from websockets.asyncio.client import connect

from comfyfleet.http.coalesce import DIRECT_WRITE_BYTES, CoalescingTransport, coalescing
from support import eventually


class Counted:
    """A real transport, with its writes counted."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


@asynccontextmanager
async def connected() -> AsyncIterator[tuple[CoalescingTransport, Counted, asyncio.StreamReader]]:
    """A coalescing transport over one end of a socket pair, and a reader of the other end."""
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    counted = Counted(transport)  # type: ignore[arg-type]
    reader, writer = await asyncio.open_connection(sock=theirs)
    try:
        yield CoalescingTransport(counted, loop), counted, reader  # type: ignore[arg-type]
    finally:
        transport.close()
        writer.close()


async def test_the_writes_of_one_step_leave_together_at_the_next_turn() -> None:
    async with connected() as (transport, counted, reader):
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        transport.write(bytearray(b"hel"))
        transport.write(memoryview(b"lo"))
        assert counted.writes == []
        assert transport.get_write_buffer_size() == 43
        await asyncio.sleep(0)  # one turn of the loop
        assert counted.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]
        assert await reader.readexactly(43) == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"


async def test_a_large_write_goes_out_at_once_after_what_was_gathered() -> None:
    async with connected() as (transport, counted, reader):
        chunk = b"x" * DIRECT_WRITE_BYTES
        transport.write(b"head")
        transport.write(chunk)
        assert counted.writes == [b"head", chunk]
        assert await reader.readexactly(4 + len(chunk)) == b"head" + chunk


async def test_closing_sends_what_was_gathered_first_and_aborting_drops_it() -> None:
    async with connected() as (transport, counted, reader):
        transport.write(b"last words")
        transport.close()
        assert counted.writes == [b"last words"]
        assert await reader.read() == b"last words"  # then the end of the stream
    async with connected() as (transport, counted, reader):
        transport.write(b"never sent")
        transport.abort()
        await asyncio.sleep(0)
        assert counted.writes == []
        assert await reader.read() == b""


async def _text(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def _frames(websocket: WebSocket) -> None:
    await websocket.accept()
    for n in range(5):
        await websocket.send_text(f"frame {n}")
    await websocket.close()


async def test_uvicorn_answers_and_streams_frames_through_it() -> None:
    """uvicorn's HTTP protocol with the coalescing transport, and the WebSocket protocol it upgrades to."""
    app = Starlette(routes=[Route("/", _text), WebSocketRoute("/ws", _frames)])
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        config = uvicorn.Config(app, http=coalescing(HttpToolsProtocol), log_config=None, lifespan="off")
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        try:
            await eventually(lambda: server.started, what="uvicorn listening")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                answers = [await client.get("/") for _ in range(3)]  # one kept-alive connection
            assert [(answer.status_code, answer.text) for answer in answers] == [(200, "hello")] * 3
            async with connect(f"ws://127.0.0.1:{port}/ws") as websocket:
                assert [await websocket.recv() for _ in range(5)] == [f"frame {n}" for n in range(5)]
        finally:
            server.should_exit = True
            await serving
