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

Inside :func:`joined_writes`, a task's writes to each connection (WebSocket frames: the gateway writes several
for one event) are held to the end of the block and leave in one ``send`` per connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, cast

_STATUS_LINE = b"HTTP/1.1 "
_END_OF_HEAD = b"\r\n\r\n"


class _Joining:
    """A joined_writes block: the transports holding its writes, and whether it is still running (a task
    started inside it inherits it, and may write after it ended)."""

    __slots__ = ("open", "transports")

    def __init__(self) -> None:
        self.open = True
        self.transports: list[HeadJoiningTransport] = []


_JOINING: ContextVar[_Joining | None] = ContextVar("joining", default=None)


@contextmanager
def joined_writes() -> Iterator[None]:
    """Writes this task makes through head-joining transports inside the block leave at its end, in one
    ``send`` per connection (also when the block raises). Keep the block short: nothing leaves before its end."""
    joining = _Joining()
    token = _JOINING.set(joining)
    try:
        yield
    finally:
        _JOINING.reset(token)
        joining.open = False
        for transport in joining.transports:
            transport.send_joined()


class HeadJoiningTransport:
    """A transport that sends a response's head together with the write that follows it."""

    __slots__ = ("_head", "_joined", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None
        self._joined: list[bytes] | None = None  # writes held by a joined_writes block

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._joined is not None:
            self._joined.append(bytes(data))
            return
        joining = _JOINING.get()
        if joining is not None and joining.open:
            held, self._head = self._head, None
            self._joined = [held, bytes(data)] if held is not None else [bytes(data)]
            joining.transports.append(self)
            return
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

    def send_joined(self) -> None:
        joined = self._joined
        if joined is not None:
            self._joined = None
            if not self._transport.is_closing():
                self._transport.write(b"".join(joined))

    def write_eof(self) -> None:
        self.flush()
        self.send_joined()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self.send_joined()
        self._transport.close()

    def abort(self) -> None:
        self._head = self._joined = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        held = len(self._head) if self._head is not None else 0
        held += sum(map(len, self._joined)) if self._joined is not None else 0
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
