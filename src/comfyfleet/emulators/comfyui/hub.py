"""The WebSocket side of the emulator: sockets by client id, and frames routed like upstream's ``send_sync``.

Upstream never writes a frame where it happens: ``send_sync`` puts ``(event, data, sid)`` on a queue and one
publisher task writes them in order. So the ``status`` frame of ``POST /prompt`` leaves *after* the HTTP
answer, and the executor never waits for a socket. :meth:`SocketHub.send` does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

if TYPE_CHECKING:
    from comfyfleet.emulators.comfyui.state import ComfyState

FEATURES = {
    "supports_preview_metadata": True,
    "supports_model_type_tags": True,
    "max_upload_size": 104857600,
    "extension": {"manager": {"supports_v4": True}},
    "node_replacements": True,
    "assets": False,
}


@dataclass(slots=True)
class Socket:
    ws: web.WebSocketResponse
    request: web.Request
    metadata_previews: bool = False

    def abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()


class SocketHub:
    """Open sockets by client id, and the ordered outbox that one publisher task drains."""

    def __init__(self) -> None:
        self.sockets: dict[str, Socket] = {}
        self._outbox: asyncio.Queue[tuple[str | bytes, str | None]] = asyncio.Queue()

    def send(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        """Upstream's ``send_sync``: to ``sockets[sid]`` when ``sid`` is set, else to every socket."""
        self._outbox.put_nowait((json.dumps({"type": event, "data": data}), sid))

    def send_bytes(self, payload: bytes, sid: str | None) -> None:
        self._outbox.put_nowait((payload, sid))

    def send_status(self, queue_remaining: int) -> None:
        """The ``status`` frame broadcast on every queue change."""
        self.send("status", {"status": {"exec_info": {"queue_remaining": queue_remaining}}}, None)

    def wants_metadata_previews(self, sid: str | None) -> bool:
        """Upstream asks the *prompt's* socket: without a client id, every socket gets the legacy format."""
        sock = self.sockets.get(sid) if sid is not None else None
        return sock is not None and sock.metadata_previews

    async def publish_forever(self) -> None:
        while True:
            payload, sid = await self._outbox.get()
            if sid is None:
                targets = list(self.sockets.values())
            else:
                target = self.sockets.get(sid)
                targets = [target] if target is not None else []
            for sock in targets:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    if isinstance(payload, bytes):
                        await sock.ws.send_bytes(payload)
                    else:
                        await sock.ws.send_str(payload)

    def abort_all(self) -> int:
        sockets = list(self.sockets.values())
        for sock in sockets:
            sock.abort()
        return len(sockets)


async def serve_socket(request: web.Request, state: ComfyState) -> web.WebSocketResponse:
    """``GET /ws``: register the socket under its ``clientId`` (or a fresh hex id) and greet it."""
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(request)
    hub = state.hub
    sid = request.query.get("clientId") or uuid.uuid4().hex
    sock = Socket(ws, request)
    hub.sockets[sid] = sock
    try:
        # Written at once, not through the outbox, like upstream's handler does.
        hello = {"status": {"exec_info": {"queue_remaining": state.queue_remaining()}}, "sid": sid}
        await ws.send_str(json.dumps({"type": "status", "data": hello}))
        if state.client_id == sid and state.last_node_id is not None:
            await ws.send_str(json.dumps({"type": "executing", "data": {"node": state.last_node_id}}))
        await _read_client_frames(ws, sock)
    finally:
        # Upstream pops by id, so a closing old socket removes a newer one registered under the same
        # id (the orphaned-reconnect pitfall). Reproduced on purpose: clients must use fresh ids.
        hub.sockets.pop(sid, None)
    return ws


async def _read_client_frames(ws: web.WebSocketResponse, sock: Socket) -> None:
    # Only a first text frame that parses as JSON can be the feature-flags handshake; upstream ignores
    # every other client frame, and a frame that is not JSON does not use up the first turn.
    first = True
    async for message in ws:
        if message.type != WSMsgType.TEXT:
            continue
        try:
            frame = json.loads(message.data)
        except ValueError:
            continue
        if not isinstance(frame, dict):
            continue
        if first and frame.get("type") == "feature_flags":
            flags = frame.get("data")
            sock.metadata_previews = isinstance(flags, dict) and bool(flags.get("supports_preview_metadata"))
            await ws.send_str(json.dumps({"type": "feature_flags", "data": FEATURES}))
        first = False
