"""An HTTP answer's head and body leave in one system call (``comfyfleet.http.head_joining``), nothing else
waits, the order never changes, and a held head is not lost when the connection closes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from websockets.asyncio.client import connect

from comfyfleet.http.head_joining import HeadJoiningTransport, joined_writes, joining_heads
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
async def connected() -> AsyncIterator[tuple[HeadJoiningTransport, Counted, asyncio.StreamReader]]:
    """A head-joining transport over one end of a socket pair, and a reader of the other end."""
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    counted = Counted(transport)  # type: ignore[arg-type]
    reader, writer = await asyncio.open_connection(sock=theirs)
    try:
        yield HeadJoiningTransport(counted, loop), counted, reader  # type: ignore[arg-type]
    finally:
        transport.close()
        writer.close()


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


async def test_a_head_leaves_with_the_body_written_after_it_at_once() -> None:
    async with connected() as (transport, counted, reader):
        transport.write(HEAD)
        assert counted.writes == []
        assert transport.get_write_buffer_size() == len(HEAD)
        transport.write(memoryview(b"hello"))
        assert counted.writes == [HEAD + b"hello"]  # at once, without waiting for the loop
        transport.write(b"more")  # anything else is written as it comes
        transport.write(bytearray(b"HTTP/1.1 is not a head without the blank line"))
        assert counted.writes[1:] == [b"more", b"HTTP/1.1 is not a head without the blank line"]
        expected = HEAD + b"hellomoreHTTP/1.1 is not a head without the blank line"
        assert await reader.readexactly(len(expected)) == expected


async def test_a_head_without_a_body_after_it_leaves_at_the_next_turn() -> None:
    async with connected() as (transport, counted, reader):
        handshake = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"
        transport.write(handshake)
        await asyncio.sleep(0)  # one turn of the loop
        assert counted.writes == [handshake]
        assert await reader.readexactly(len(handshake)) == handshake


async def test_closing_sends_a_held_head_first_and_aborting_drops_it() -> None:
    async with connected() as (transport, counted, reader):
        transport.write(HEAD)
        transport.close()
        assert counted.writes == [HEAD]
        assert await reader.read() == HEAD  # then the end of the stream
    async with connected() as (transport, counted, reader):
        transport.write(HEAD)
        transport.abort()
        await asyncio.sleep(0)
        assert counted.writes == []
        assert await reader.read() == b""


async def test_writes_in_a_joined_block_leave_together_at_its_end() -> None:
    async with connected() as (one, one_counted, one_reader), connected() as (two, two_counted, two_reader):
        one.write(b"before ")
        one.write(HEAD)  # a held head joins the block's writes, in its place
        with joined_writes():
            one.write(b"hello")
            two.write(b"frame 1 ")
            one.write(memoryview(b" frame"))
            two.write(bytearray(b"frame 2"))
            assert one_counted.writes == [b"before "]
            assert two_counted.writes == []
            assert one.get_write_buffer_size() == len(HEAD + b"hello frame")
        assert one_counted.writes == [b"before ", HEAD + b"hello frame"]  # one send per connection
        assert two_counted.writes == [b"frame 1 frame 2"]
        one.write(b" after")  # outside the block: at once again
        assert one_counted.writes[-1] == b" after"
        expected = b"before " + HEAD + b"hello frame after"
        assert await one_reader.readexactly(len(expected)) == expected
        assert await two_reader.readexactly(15) == b"frame 1 frame 2"


async def test_a_joined_block_sends_when_it_raises_and_holds_no_write_made_outside_it() -> None:
    async with connected() as (transport, counted, reader):

        def write_and_fail() -> None:
            with joined_writes():
                transport.write(b"sent ")
                raise RuntimeError("the block failed")

        with pytest.raises(RuntimeError):
            write_and_fail()
        assert counted.writes == [b"sent "]

        go = asyncio.Event()

        async def write_when_told() -> None:
            await go.wait()
            transport.write(b"now")

        outside = asyncio.create_task(write_when_told())
        with joined_writes():
            go.set()
            await outside  # another task's writes are not held by this block
            assert counted.writes == [b"sent ", b"now"]
            go.clear()
            inside = asyncio.create_task(write_when_told())  # started in the block, writing after it
        go.set()
        await inside
        assert counted.writes == [b"sent ", b"now", b"now"]
        assert await reader.readexactly(11) == b"sent nownow"


async def test_closing_in_a_joined_block_sends_its_writes_first_and_aborting_drops_them() -> None:
    async with connected() as (transport, counted, reader):
        with joined_writes():
            transport.write(b"last frame")
            transport.close()
            assert counted.writes == [b"last frame"]
        assert await reader.read() == b"last frame"
    async with connected() as (transport, counted, reader):
        with joined_writes():
            transport.write(b"dropped")
            transport.abort()
        assert counted.writes == []
        assert await reader.read() == b""


async def _text(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def _frames(websocket: WebSocket) -> None:
    await websocket.accept()
    for n in range(5):
        await websocket.send_text(f"frame {n}")
    with joined_writes():
        for n in range(5, 10):
            await websocket.send_text(f"frame {n}")
        await websocket.close()


async def test_uvicorn_answers_and_streams_frames_through_it() -> None:
    """uvicorn's HTTP protocol with the head-joining transport, and the WebSocket protocol it upgrades to."""
    app = Starlette(routes=[Route("/", _text), WebSocketRoute("/ws", _frames)])
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        config = uvicorn.Config(app, http=joining_heads(HttpToolsProtocol), log_config=None, lifespan="off")
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        try:
            await eventually(lambda: server.started, what="uvicorn listening")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                answers = [await client.get("/") for _ in range(3)]  # one kept-alive connection
            assert [(answer.status_code, answer.text) for answer in answers] == [(200, "hello")] * 3
            async with connect(f"ws://127.0.0.1:{port}/ws") as websocket:
                assert [await websocket.recv() for _ in range(10)] == [f"frame {n}" for n in range(10)]
        finally:
            server.should_exit = True
            await serving
