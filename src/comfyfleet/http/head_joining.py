"""One system call for an HTTP answer's head and body.

uvicorn writes a response's status line and headers with one ``transport.write`` and its body with another;
with ``TCP_NODELAY`` each write is a ``send`` and a packet. On loopback a ``send`` also runs the receiver's
side of TCP in the sender's time, so it costs as much CPU as the rest of a small answer, and the client wakes
twice.

:class:`HeadJoiningTransport` sits between uvicorn's protocol and the connection's transport. A write that is
a response head (it starts with ``HTTP/1.1`` and ends with the blank line) is held; the next write (the
body, which uvicorn writes in the same step) takes it along, so the answer leaves in one ``send`` without
waiting. A head with no body after it (a streamed answer whose first chunk comes later, a WebSocket
handshake) leaves at the next turn of the loop. Everything else is written at once, as without it; closing
sends a held head first. Which writes are held never changes what is sent, nor its order.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

_STATUS_LINE = b"HTTP/1.1 "
_END_OF_HEAD = b"\r\n\r\n"


class HeadJoiningTransport:
    """A transport that sends a response's head together with the write that follows it."""

    __slots__ = ("_head", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
        elif data[:9] == _STATUS_LINE and data[-4:] == _END_OF_HEAD:
            self._head = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if not self._transport.is_closing():
                self._transport.write(head)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._head = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        held = len(self._head) if self._head is not None else 0
        return self._transport.get_write_buffer_size() + held

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def joining_heads(protocol_class: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol ``protocol_class``, writing through a :class:`HeadJoiningTransport` (the
    WebSocket protocol a connection is upgraded to is handed the same transport)."""

    class HeadJoining(protocol_class):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports are not asyncio.Transport subclasses, but they are transports
            connection = cast("asyncio.Transport", transport)
            super().connection_made(HeadJoiningTransport(connection, asyncio.get_running_loop()))

    HeadJoining.__name__ = HeadJoining.__qualname__ = f"HeadJoining{protocol_class.__name__}"
    return HeadJoining
