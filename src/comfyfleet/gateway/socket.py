"""``GET /ws?clientId=X``: ComfyUI's WebSocket, fed by comfyfleet's live task events.

ComfyUI's routing is kept: ``status`` frames (the queue length) go to every socket (another client's prompts
change it at any rate, so a socket hears of those at most every ``STATUS_INTERVAL_S``); the frames of a
prompt (``execution_start``, ``execution_cached``, ``executing``, ``progress``, ``executed``,
``progress_state``, ``execution_success`` / ``execution_error`` / ``execution_interrupted``, and the final
``executing`` with ``node: null``) go only to the sockets whose clientId is the prompt's ``client_id``. The
order is ComfyUI's:

    status, execution_start, execution_cached, (progress_state, executing{node}, (progress, progress_state)…)…,
    executed{node}…, progress_state, execution_success, status, executing{node: null}

``progress_state`` is ComfyUI's snapshot of every node that started (``running`` or ``finished``, with its
value and max), sent when a node starts, moves and finishes.

``executed`` frames come once the task's outputs are stored (their files are then served by ``/view``),
so ``executing{node: null}`` still means what ComfyUI clients rely on: the history entry is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import struct
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from comfyfleet.domain import TERMINAL_STATUSES, TaskStatus
from comfyfleet.events import Subscription, TaskEvent
from comfyfleet.gateway import shapes
from comfyfleet.gateway.service import Gateway, changes_queue_length
from comfyfleet.http.head_joining import joined_writes
from comfyfleet.http.responses import json_bytes
from comfyfleet.store import NotFound, StoreError

logger = logging.getLogger(__name__)

_REMEMBERED_PROMPTS = 1000  # per socket: enough to ignore a late duplicate event of a finished prompt
_RELAYED = frozenset({"status", "progress", "preview"})  # the event types a socket turns into frames
# Another client's prompts change the queue's length at any rate; each socket is told at most this often.
STATUS_INTERVAL_S = 0.1
_JOINED_EVENTS = 32  # at most this many events' frames in one send


@dataclass(slots=True)
class _PromptFrames:
    """What this socket already told about one prompt."""

    started: bool = False
    node: str | None = None
    finished: bool = False
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # the progress_state snapshot


def _frame(kind: str, data: dict[str, Any]) -> str:
    return json_bytes({"type": kind, "data": data}).decode()


def _now_ms() -> int:
    return int(time.time() * 1000)


class ComfySocket:
    def __init__(
        self,
        websocket: WebSocket,
        gateway: Gateway,
        tenant: str | None,
        client_id: str | None,
    ) -> None:
        self.websocket = websocket
        self.gateway = gateway
        self.bus = gateway.bus
        self.tenant = tenant
        self.sid = client_id or uuid.uuid4().hex
        self.prompts: OrderedDict[str, _PromptFrames] = OrderedDict()
        self.last_remaining: int | None = None
        self.status_sent_at = -math.inf
        self.status_due = False  # an unforced status frame waits for the end of the interval

    async def send(self, kind: str, data: dict[str, Any]) -> None:
        await self.websocket.send_text(_frame(kind, data))

    async def send_status(self, *, force: bool = False, sid: bool = False) -> None:
        """A ``status`` frame with the queue's length, if it changed (always when forced: the frames of this
        client's own prompts). Unforced ones come at most every ``STATUS_INTERVAL_S``: one asked for sooner
        is sent when the interval is over, with the length as it is then."""
        now = time.monotonic()
        if not force:
            if self.status_due:
                return
            if now - self.status_sent_at < STATUS_INTERVAL_S:
                self.status_due = True
                return
        self.status_due = False
        remaining = await self.gateway.queue_remaining(self.tenant)
        if not force and remaining == self.last_remaining:
            return
        self.last_remaining = remaining
        self.status_sent_at = now
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": remaining}}}
        if sid:
            data["sid"] = self.sid
        await self.send("status", data)

    async def serve(self) -> None:
        await self.websocket.accept()
        if self.bus is None:
            await self.send_status(force=True, sid=True)
            await self._read()
            return
        with self.bus.subscribe(tenant=self.tenant, maxsize=4096, only=self._wants) as subscription:
            await self.send_status(force=True, sid=True)
            async with asyncio.TaskGroup() as group:
                reader = group.create_task(self._read(), name=f"ws-read-{self.sid}")
                writer = group.create_task(self._write(subscription), name=f"ws-write-{self.sid}")
                # Whichever ends first (the client left, or sending failed) ends the other.
                reader.add_done_callback(lambda _: writer.cancel())
                writer.add_done_callback(lambda _: reader.cancel())

    async def _read(self) -> None:
        first = True
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if first and text:
                    # ComfyUI answers only a first frame announcing feature flags; it ignores the rest.
                    with contextlib.suppress(ValueError, AttributeError, RecursionError):
                        frame = json.loads(text)
                        if frame.get("type") == "feature_flags":
                            await self.send("feature_flags", {"supports_preview_metadata": False})
                first = False

    async def _write(self, subscription: Subscription) -> None:
        try:
            while True:
                wait_s = None
                if self.status_due:
                    wait_s = max(0.0, self.status_sent_at + STATUS_INTERVAL_S - time.monotonic())
                event = await subscription.get(wait_s)
                # The frames of the events at hand leave together: one send, where each was one.
                with joined_writes():
                    if event is None:  # the due status frame's time came
                        self.status_due = False
                        await self.send_status()
                    else:
                        for each in [event, *subscription.ready(_JOINED_EVENTS - 1)]:
                            await self._relay(each)
        except (WebSocketDisconnect, RuntimeError, OSError):
            return  # the client went away while we were sending

    def _wants(self, event: TaskEvent) -> bool:
        """Whether an event may make this socket send a frame; the rest are not queued for it, nor is its
        writer woken (with many clients connected, most events are of other clients' prompts). Of another
        client's prompt only a change of the queue's length counts (the prompt queued or ended), and not
        while a status frame is already due."""
        if event.type not in _RELAYED:
            return False
        known, client = self.gateway.known_client_of(event.task_id)
        if not known or client == self.sid:
            return True
        return changes_queue_length(event) and not self.status_due

    async def _relay(self, event: TaskEvent) -> None:
        mine = await self.gateway.client_of(event.task_id) == self.sid
        if event.type == "status":
            await self._on_status(event, mine)
        elif event.type == "progress" and mine:
            await self._on_progress(event)
        elif event.type == "preview" and mine:
            await self._on_preview(event)

    async def _on_preview(self, event: TaskEvent) -> None:
        """Relay the preview as ComfyUI's binary PREVIEW_IMAGE frame (type 1, then 1 = JPEG or 2 = PNG)."""
        previews = self.gateway.services.previews
        latest = previews.latest_preview(event.task_id) if previews is not None else None
        if latest is None:
            return  # run by another replica, which keeps the image
        image, content_type, _ = latest
        image_format = 2 if content_type == "image/png" else 1
        await self.websocket.send_bytes(struct.pack(">II", 1, image_format) + image)

    async def _start(self, task_id: str, state: _PromptFrames) -> None:
        if state.started:
            return
        state.started = True
        stamp = _now_ms()
        await self.send("execution_start", {"prompt_id": task_id, "timestamp": stamp})
        await self.send("execution_cached", {"nodes": [], "prompt_id": task_id, "timestamp": stamp})

    def _state(self, task_id: str) -> _PromptFrames:
        state = self.prompts.get(task_id)
        if state is None:
            state = self.prompts[task_id] = _PromptFrames()
            while len(self.prompts) > _REMEMBERED_PROMPTS:
                self.prompts.popitem(last=False)
        return state

    async def _on_progress(self, event: TaskEvent) -> None:
        state = self._state(event.task_id)
        if state.finished:
            return
        await self._start(event.task_id, state)
        node = event.data.get("node")
        node = None if node is None else str(node)
        if node is not None and node != state.node:
            await self._finish_node(event.task_id, state)
            state.node = node
            await self._node_state(event.task_id, state, node, "running", 0, 1)
            await self.send("executing", {"node": node, "display_node": node, "prompt_id": event.task_id})
        value, maximum = event.data.get("value"), event.data.get("max")
        if node is not None and value is not None and maximum is not None:
            await self.send(
                "progress", {"value": value, "max": maximum, "prompt_id": event.task_id, "node": node}
            )
            await self._node_state(event.task_id, state, node, "running", value, maximum)

    async def _node_state(
        self, task_id: str, state: _PromptFrames, node: str, status: str, value: float, maximum: float
    ) -> None:
        state.nodes[node] = {
            "value": value, "max": maximum, "state": status, "node_id": node, "prompt_id": task_id,
            "display_node_id": node, "parent_node_id": None, "real_node_id": node,
        }  # fmt: skip
        await self.send("progress_state", {"prompt_id": task_id, "nodes": dict(state.nodes)})

    async def _finish_node(self, task_id: str, state: _PromptFrames) -> None:
        if state.node is not None and state.nodes.get(state.node, {}).get("state") == "running":
            await self._node_state(task_id, state, state.node, "finished", 1, 1)

    async def _on_status(self, event: TaskEvent, mine: bool) -> None:
        status = event.data.get("status")
        terminal = status in TERMINAL_STATUSES
        if not mine:
            await self.send_status()
            return
        state = self._state(event.task_id)
        if state.finished:
            return
        if status == TaskStatus.PENDING.value:
            state.started, state.node = False, None  # a retry: its next attempt starts afresh
            state.nodes.clear()
            await self.send_status()
            return
        if status == TaskStatus.RUNNING.value:
            if event.data.get("phase") == "executing":
                await self._start(event.task_id, state)
            await self.send_status()
            return
        if not terminal:
            return
        state.finished = True
        try:
            # This replica's own ending carries the task as written; another's is read back.
            task = event.task or await self.gateway.store.get_task(event.task_id)
        except (NotFound, StoreError):
            logger.warning("gateway_ws_task_unreadable task_id=%s", event.task_id)
            await self.send_status(force=True)
            return
        if task.status is TaskStatus.CANCELLED and not shapes.enters_history(task):
            # Deleted from the queue before it ran: ComfyUI only reports the shorter queue.
            await self.send_status(force=True)
            return
        await self._start(task.id, state)
        if task.status is TaskStatus.COMPLETED:
            for node_id, output in shapes.outputs_by_node(task).items():
                await self.send(
                    "executed",
                    {"node": node_id, "display_node": node_id, "output": output, "prompt_id": task.id},
                )
            await self._finish_node(task.id, state)
            await self.send(
                "execution_success", {"prompt_id": task.id, "timestamp": shapes.millis(task.completed_at)}
            )
        elif task.status is TaskStatus.CANCELLED:
            await self.send("execution_interrupted", shapes.interrupted_message(task))
        else:
            await self.send("execution_error", shapes.error_message(task))
        await self.send_status(force=True)
        await self.send("executing", {"node": None, "prompt_id": task.id})
