"""One system call for what the server writes to a connection in one step of the event loop.

uvicorn writes a response's status line and headers, then its body, each with its own ``transport.write``,
and a WebSocket frame each with its own; with ``TCP_NODELAY`` every write is a ``send`` and a packet. On
loopback a ``send`` also runs the receiver's side of TCP in the sender's time, so it costs as much CPU as
the rest of a small answer. The gateway sends a ComfyUI client several frames at once (``executed``,
``progress_state``, ``execution_success``, ``status``, ``executing``), and every answer is a head and a body.

:class:`CoalescingTransport` sits between uvicorn's protocol and the connection's transport: small writes
are gathered and sent together at the next turn of the loop (``call_soon``), so what one step of a request
or a socket writes leaves in one ``send``. Writes of ``DIRECT_WRITE_BYTES`` or more (a file's chunks) go out
at once, after what was gathered, so large transfers and uvicorn's flow control (the transport's
buffer, its high-water mark) behave as without it. Closing sends what was gathered first.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

DIRECT_WRITE_BYTES = 16 * 1024


class CoalescingTransport:
    """A transport whose small writes leave together at the next turn of the loop."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) >= DIRECT_WRITE_BYTES:
            self.flush()
            self._transport.write(data)
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        if not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(chunk) for chunk in self._pending)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def coalescing(protocol_class: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol ``protocol_class``, writing through a :class:`CoalescingTransport` (the
    WebSocket protocol a connection is upgraded to is handed the same transport)."""

    class Coalescing(protocol_class):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports are not asyncio.Transport subclasses, but they are transports
            connection = cast("asyncio.Transport", transport)
            super().connection_made(CoalescingTransport(connection, asyncio.get_running_loop()))

    Coalescing.__name__ = Coalescing.__qualname__ = f"Coalescing{protocol_class.__name__}"
    return Coalescing
