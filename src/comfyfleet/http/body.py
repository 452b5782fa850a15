"""Reading a request's body straight from ASGI messages, for the paths answered before the router."""

from __future__ import annotations

from starlette.types import Message, Receive


async def read_body(receive: Receive, received: list[Message] | None = None) -> bytes | None:
    """The whole request body, or None when the client went away first. Every message read is appended to
    ``received`` (when given), so that another handler can be given the request as it came."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if received is not None:
            received.append(message)
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
