"""The one WebSocket of a :class:`~comfyfleet.comfy.client.ComfyClient`: it connects under a fresh
``clientId`` each time, reconnects with back-off, and routes every frame to the prompt it belongs to.

Frames for a prompt are buffered from the moment it is submitted (they may arrive before ``follow`` starts,
even before the ``POST /prompt`` answer). Upstream tags most frames with their ``prompt_id``; those that carry
none (``progress`` of some nodes, previews, ``executing`` after a reconnect) belong to the prompt running at
the time.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable

import websockets
from websockets.asyncio.client import ClientConnection, connect

from comfyfleet.comfy.events import ComfyEvent, parse_binary, parse_text

logger = logging.getLogger(__name__)

# Frames that carry no prompt_id but belong to the prompt running at the time.
_UNTAGGED_BELONG_TO_RUNNING = frozenset(
    {"executing", "progress", "progress_state", "preview", "text", "executed"}
)


class PromptWatch:
    """Frames of one prompt, buffered from before ``follow`` starts (the prompt may finish first)."""

    __slots__ = ("changed", "client_id", "done", "events", "prompt_id", "queue_changed")

    def __init__(self, prompt_id: str, client_id: str | None) -> None:
        self.prompt_id = prompt_id
        self.client_id = client_id
        self.events: list[ComfyEvent] = []
        self.done = False
        self.queue_changed = False  # a status frame came while this prompt had not started
        self.changed = asyncio.Event()

    def push(self, event: ComfyEvent) -> None:
        self.events.append(event)
        if event.is_done:
            self.done = True
        self.changed.set()


class EventStream:
    """Connection state and frame routing; :meth:`run` keeps the socket open until cancelled."""

    MAX_WATCHES = 10_000

    def __init__(self, base_url: str, *, open_timeout_s: float, reconnect_max_s: float) -> None:
        self.base_url = base_url
        self._open_timeout_s = open_timeout_s
        self._reconnect_max_s = reconnect_max_s
        self.client_id = uuid.uuid4().hex
        self.live_client_id: str | None = None
        self.first_attempt = asyncio.Event()
        self.watches: dict[str, PromptWatch] = {}
        self.queue_remaining: int | None = None
        self.last_frame_at: float | None = None
        self.reconnects = 0
        self._running_prompt: str | None = None
        self._listeners: list[Callable[[ComfyEvent], None]] = []

    @property
    def connected(self) -> bool:
        return self.live_client_id is not None and self.live_client_id == self.client_id

    def routed(self, watch: PromptWatch) -> bool:
        """Whether this prompt's frames come to the socket that is open now."""
        return watch.client_id is not None and watch.client_id == self.live_client_id

    def add_listener(self, callback: Callable[[ComfyEvent], None]) -> Callable[[], None]:
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def watch(self, prompt_id: str, client_id: str | None) -> PromptWatch:
        watch = self.watches.get(prompt_id)
        if watch is None:
            if len(self.watches) >= self.MAX_WATCHES:
                # Submitted but never followed: drop the oldest buffers rather than grow without bound.
                for stale in list(self.watches)[: self.MAX_WATCHES // 10]:
                    del self.watches[stale]
            watch = self.watches[prompt_id] = PromptWatch(prompt_id, client_id)
        elif client_id is not None:
            watch.client_id = client_id
        return watch

    def forget(self, prompt_id: str) -> None:
        self.watches.pop(prompt_id, None)

    def release(self, watch: PromptWatch) -> None:
        """The follower of ``watch`` is done with it."""
        if self.watches.get(watch.prompt_id) is watch:
            del self.watches[watch.prompt_id]

    def wake_all(self) -> None:
        for watch in self.watches.values():
            watch.changed.set()  # followers re-decide between frames and polling

    # -- the connection ------------------------------------------------------------------------------
    def _url(self, client_id: str) -> str:
        scheme, _, rest = self.base_url.partition("://")
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={client_id}"

    async def run(self) -> None:
        backoff = 0.05
        while True:
            # A fresh id per connection: upstream orphans a new socket that reuses a closing one's id.
            client_id = uuid.uuid4().hex
            self.client_id = client_id
            try:
                async with connect(
                    self._url(client_id),
                    open_timeout=self._open_timeout_s,
                    ping_interval=20,
                    ping_timeout=20,
                    max_size=None,
                    compression=None,
                ) as ws:
                    self._set_live(client_id)
                    backoff = 0.05
                    await self._read_frames(ws)
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                logger.debug(
                    "comfy_socket_closed url=%s client_id=%s error=%s", self.base_url, client_id, exc
                )
            except Exception:
                logger.exception("comfy_socket_failed url=%s client_id=%s", self.base_url, client_id)
            finally:
                self._set_live(None)
                self.first_attempt.set()
            self.reconnects += 1
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._reconnect_max_s)

    def _set_live(self, client_id: str | None) -> None:
        if self.live_client_id == client_id:
            return
        self.live_client_id = client_id
        self._running_prompt = None
        if client_id is not None:
            self.first_attempt.set()
        self.wake_all()

    async def _read_frames(self, ws: ClientConnection) -> None:
        async for frame in ws:
            self.last_frame_at = time.monotonic()
            event = parse_text(frame) if isinstance(frame, str) else parse_binary(frame)
            if event is None:
                continue
            self.route(event)

    def route(self, event: ComfyEvent) -> None:
        prompt_id = event.prompt_id
        if event.type == "status":
            exec_info = (event.data.get("status") or {}).get("exec_info") or {}
            if isinstance(exec_info.get("queue_remaining"), int):
                self.queue_remaining = exec_info["queue_remaining"]
            for waiting in self.watches.values():
                if not waiting.events and waiting.client_id == self.live_client_id:
                    waiting.queue_changed = True
                    waiting.changed.set()
        elif prompt_id is None and event.type in _UNTAGGED_BELONG_TO_RUNNING and self._running_prompt:
            event = event.with_prompt(self._running_prompt)
            prompt_id = self._running_prompt
        if prompt_id is not None:
            if event.is_done:
                if self._running_prompt == prompt_id:
                    self._running_prompt = None
            elif event.type in ("execution_start", "executing", "progress"):
                self._running_prompt = prompt_id
            watch = self.watches.get(prompt_id)
            if watch is not None:
                watch.push(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                logger.exception("comfy_listener_failed url=%s event=%s", self.base_url, event.type)
