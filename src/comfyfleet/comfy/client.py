"""An async client for one ComfyUI server: HTTP calls plus ONE WebSocket that follows every prompt.

Protocol facts this client is built around (see the ComfyUI protocol reference):

* Every WebSocket connection gets a fresh ``clientId``: reusing one can orphan the new socket.
* A prompt is done when ``executing`` arrives with ``node: null`` and its ``prompt_id``; the outcome frames
  (``execution_success`` …) come *before* the history write, so they are never taken as completion.
* Frames for a prompt go only to the socket whose id was given at submit time. After a reconnect (new id)
  those prompts are followed by polling ``/api/jobs/{id}``, as are prompts of a silent socket.
* ``/api/jobs/{id}`` answers 404 for a prompt the server does not know: after a restart, that is a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import httpx
import websockets
from websockets.asyncio.client import ClientConnection, connect

from comfyfleet.comfy.errors import (
    ClientStateError,
    ComfyTimeout,
    OutputNotFound,
    PromptLost,
    UnexpectedResponse,
    WorkerUnreachable,
    WorkflowRejected,
)
from comfyfleet.comfy.events import ComfyEvent, parse_binary, parse_text

logger = logging.getLogger(__name__)

EventCallback = Callable[[ComfyEvent], Awaitable[None] | None]
TERMINAL_JOB_STATUSES = frozenset({"completed", "failed", "cancelled"})
_JSON_HEADERS = {"Content-Type": "application/json"}
# Frames that carry no prompt_id but belong to the prompt running at the time.
# How long a status frame may precede the execution_start of a prompt before a poll checks on it.
_START_GRACE_S = 0.02
_UNTAGGED_BELONG_TO_RUNNING = frozenset(
    {"executing", "progress", "progress_state", "preview", "text", "executed"}
)


@dataclass(frozen=True, slots=True)
class SubmitResult:
    prompt_id: str
    number: float
    node_errors: dict[str, Any]


@dataclass(frozen=True, slots=True)
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]

    @classmethod
    def from_wire(cls, item: Sequence[Any]) -> QueueItem:
        return cls(
            item[0],
            item[1],
            item[2],
            item[3] if len(item) > 3 else {},
            list(item[4]) if len(item) > 4 else [],
        )


@dataclass(frozen=True, slots=True)
class QueueState:
    running: list[QueueItem]
    pending: list[QueueItem]  # in run order (sorted by number), not upstream's heap order

    @property
    def remaining(self) -> int:
        return len(self.running) + len(self.pending)

    def __contains__(self, prompt_id: object) -> bool:
        return any(item.prompt_id == prompt_id for item in (*self.running, *self.pending))

    def is_running(self, prompt_id: str) -> bool:
        return any(item.prompt_id == prompt_id for item in self.running)


@dataclass(frozen=True, slots=True)
class PromptTimings:
    """Epoch milliseconds from the server's clock (``None`` when unknown)."""

    created_ms: int | None
    started_ms: int | None
    ended_ms: int | None

    @property
    def queued_s(self) -> float | None:
        if self.created_ms is None or self.started_ms is None:
            return None
        return max(0.0, (self.started_ms - self.created_ms) / 1000)

    @property
    def execution_s(self) -> float | None:
        if self.started_ms is None or self.ended_ms is None:
            return None
        return max(0.0, (self.ended_ms - self.started_ms) / 1000)


@dataclass(frozen=True, slots=True)
class PromptOutcome:
    prompt_id: str
    status: Literal["success", "error", "interrupted"]
    outputs: dict[str, Any]
    error: dict[str, Any] | None
    history: dict[str, Any]
    timings: PromptTimings

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def files(self) -> list[dict[str, Any]]:
        """Every ``{filename, subfolder, type}`` in the outputs, with ``node_id`` and ``kind`` (``images``…)."""
        return [
            {**item, "node_id": node_id, "kind": kind}
            for node_id, ui in self.outputs.items()
            if isinstance(ui, dict)
            for kind, items in ui.items()
            if isinstance(items, list)
            for item in items
            if isinstance(item, dict) and "filename" in item
        ]


def outcome_from_history(prompt_id: str, entry: dict[str, Any]) -> PromptOutcome:
    """Read a history entry: an interrupted prompt also says ``status_str: "error"``; its last message tells."""
    status = entry.get("status") or {}
    messages = [m for m in status.get("messages") or [] if isinstance(m, list | tuple) and len(m) == 2]
    kinds = {m[0]: m[1] for m in messages if isinstance(m[1], dict)}
    result: Literal["success", "error", "interrupted"]
    error = None
    if status.get("status_str") == "success":
        result = "success"
    elif "execution_interrupted" in kinds:
        result = "interrupted"
        error = kinds["execution_interrupted"]
    else:
        result = "error"
        error = kinds.get("execution_error")
    prompt = entry.get("prompt") or []
    extra_data = prompt[3] if len(prompt) > 3 and isinstance(prompt[3], dict) else {}
    start = kinds.get("execution_start", {}).get("timestamp")
    end = messages[-1][1].get("timestamp") if messages and isinstance(messages[-1][1], dict) else None
    return PromptOutcome(
        prompt_id=prompt_id,
        status=result,
        outputs=dict(entry.get("outputs") or {}),
        error=error,
        history=entry,
        timings=PromptTimings(extra_data.get("create_time"), start, end),
    )


class _PromptWatch:
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


class ComfyClient:
    """One client per ComfyUI server. Use as ``async with ComfyClient(url) as comfy: ...``.

    ``events=False`` skips the WebSocket (health probes, one-off calls); ``follow`` then polls.
    """

    _MAX_WATCHES = 10_000

    def __init__(
        self,
        base_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        events: bool = True,
        poll_interval_s: float = 0.1,
        max_poll_interval_s: float = 1.0,
        unreachable_after_s: float = 30.0,
        reconnect_max_s: float = 5.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._transport = transport
        self._timeout = timeout
        self._events = events
        self._poll_interval_s = poll_interval_s
        self._max_poll_interval_s = max_poll_interval_s
        self._unreachable_after_s = unreachable_after_s
        self._reconnect_max_s = reconnect_max_s
        self._http: httpx.AsyncClient | None = None
        self._state: Literal["new", "open", "closed"] = "new"
        self._events_task: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self.client_id = uuid.uuid4().hex
        self._live_client_id: str | None = None
        self._running_prompt: str | None = None
        self._watches: dict[str, _PromptWatch] = {}
        self._listeners: list[Callable[[ComfyEvent], None]] = []
        self._object_info: dict[str, Any] | None = None
        self._object_info_lock = asyncio.Lock()
        self.queue_remaining: int | None = None
        self.last_frame_at: float | None = None
        self.reconnects = 0

    # -- lifecycle -----------------------------------------------------------------------------------
    async def __aenter__(self) -> ComfyClient:
        if self._state != "new":
            raise ClientStateError(f"ComfyClient for {self.base_url} cannot be opened twice")
        self._http = httpx.AsyncClient(
            base_url=self.base_url, transport=self._transport, timeout=self._timeout
        )
        self._state = "open"
        if self._events:
            # Owned by this client and cancelled and awaited in close(); not a TaskGroup because the
            # client's lifetime spans __aenter__/__aexit__, which callers may run in different tasks.
            self._events_task = asyncio.get_running_loop().create_task(
                self._run_events(), name=f"comfy-events {self.base_url}"
            )
            # Give the first connection a moment so the first submit is routed to a live socket.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(self._timeout, 5.0)):
                    await self._first_attempt.wait()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        task, self._events_task = self._events_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for watch in self._watches.values():
            watch.changed.set()
        if self._http is not None:
            await self._http.aclose()

    def _check_open(self) -> httpx.AsyncClient:
        if self._state != "open" or self._http is None:
            raise ClientStateError(
                f"ComfyClient for {self.base_url} is {'closed' if self._state == 'closed' else 'not open yet'}"
            )
        return self._http

    @property
    def connected(self) -> bool:
        """Whether the WebSocket is open right now (under ``client_id``)."""
        return self._live_client_id is not None and self._live_client_id == self.client_id

    def add_listener(self, callback: Callable[[ComfyEvent], None]) -> Callable[[], None]:
        """Call ``callback`` for every frame (``status`` included); returns a function that removes it."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    # -- HTTP plumbing -------------------------------------------------------------------------------
    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        http = self._check_open()
        try:
            return await http.request(method, path, **kwargs)
        except httpx.ConnectTimeout as exc:
            raise WorkerUnreachable(f"{method} {self.base_url}{path}: connect timed out") from exc
        except httpx.TimeoutException as exc:
            raise ComfyTimeout(f"{method} {self.base_url}{path}: no answer within {self._timeout}s") from exc
        except httpx.TransportError as exc:
            raise WorkerUnreachable(f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}") from exc

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._request(method, path, **kwargs)
        if response.status_code != 200:
            raise UnexpectedResponse(method, path, response.status_code, response.text)
        try:
            return response.json()
        except ValueError as exc:
            raise UnexpectedResponse(method, path, response.status_code, response.text) from exc

    async def _post_empty(self, path: str, body: dict[str, Any]) -> None:
        response = await self._request("POST", path, content=json.dumps(body), headers=_JSON_HEADERS)
        if response.status_code != 200:
            raise UnexpectedResponse("POST", path, response.status_code, response.text)

    # -- prompts -------------------------------------------------------------------------------------
    def _watch(self, prompt_id: str, client_id: str | None) -> _PromptWatch:
        watch = self._watches.get(prompt_id)
        if watch is None:
            if len(self._watches) >= self._MAX_WATCHES:
                # Submitted but never followed: drop the oldest buffers rather than grow without bound.
                for stale in list(self._watches)[: self._MAX_WATCHES // 10]:
                    del self._watches[stale]
            watch = self._watches[prompt_id] = _PromptWatch(prompt_id, client_id)
        elif client_id is not None:
            watch.client_id = client_id
        return watch

    def forget(self, prompt_id: str) -> None:
        """Drop buffered frames of a prompt that will not be followed."""
        self._watches.pop(prompt_id, None)

    async def submit(
        self,
        graph: dict[str, Any],
        *,
        prompt_id: str,
        front: bool = False,
        extra_data: dict[str, Any] | None = None,
        client_id: str | None = None,
    ) -> SubmitResult:
        """Queue ``graph`` under the caller's ``prompt_id`` (a lowercase UUID the caller keeps unique).

        Raises :class:`WorkflowRejected` on ComfyUI's 400. A :class:`ComfyTimeout` leaves the outcome
        unknown: ask :meth:`job` before submitting again."""
        self._check_open()
        routed_to = client_id or self.client_id
        payload: dict[str, Any] = {"prompt": graph, "prompt_id": prompt_id, "client_id": routed_to}
        if front:
            payload["front"] = True
        if extra_data:
            payload["extra_data"] = extra_data
        self._watch(prompt_id, routed_to)  # before the POST: frames may arrive before its answer
        try:
            response = await self._request(
                "POST", "/prompt", content=json.dumps(payload), headers=_JSON_HEADERS
            )
        except WorkerUnreachable:
            self.forget(prompt_id)
            raise
        if response.status_code == 200:
            try:
                body = response.json()
                return SubmitResult(
                    str(body["prompt_id"]), body["number"], dict(body.get("node_errors") or {})
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise UnexpectedResponse("POST", "/prompt", 200, response.text) from exc
        self.forget(prompt_id)
        if response.status_code == 400:
            try:
                body = response.json()
                error, node_errors = body["error"], body.get("node_errors") or {}
            except (ValueError, KeyError, TypeError) as exc:
                raise UnexpectedResponse("POST", "/prompt", 400, response.text) from exc
            if isinstance(error, str):  # some servers (and proxies) answer a bare message
                error = {"type": "error", "message": error, "details": "", "extra_info": {}}
            raise WorkflowRejected(error, node_errors)
        raise UnexpectedResponse("POST", "/prompt", response.status_code, response.text)

    async def job(self, prompt_id: str) -> dict[str, Any] | None:
        """``GET /api/jobs/{id}``; None when the server does not know the prompt."""
        response = await self._request("GET", f"/api/jobs/{quote(prompt_id, safe='')}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise UnexpectedResponse("GET", "/api/jobs/{id}", response.status_code, response.text)
        try:
            body: dict[str, Any] = response.json()
        except ValueError as exc:
            raise UnexpectedResponse("GET", "/api/jobs/{id}", 200, response.text) from exc
        return body

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry, or None (unknown, not finished yet, or deleted: upstream cannot tell)."""
        body = await self._json("GET", f"/history/{quote(prompt_id, safe='')}")
        entry = body.get(prompt_id) if isinstance(body, dict) else None
        return entry if isinstance(entry, dict) else None

    async def delete_history(self, prompt_ids: Sequence[str]) -> None:
        await self._post_empty("/history", {"delete": list(prompt_ids)})

    async def queue(self) -> QueueState:
        body = await self._json("GET", "/queue")
        running = [QueueItem.from_wire(item) for item in body.get("queue_running", [])]
        pending = sorted(
            (QueueItem.from_wire(item) for item in body.get("queue_pending", [])), key=lambda i: i.number
        )
        return QueueState(running, pending)

    async def delete_from_queue(self, prompt_ids: Sequence[str]) -> None:
        """Remove pending prompts (a running one is untouched: use :meth:`interrupt`)."""
        await self._post_empty("/queue", {"delete": list(prompt_ids)})

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt ``prompt_id`` if it is running; a no-op otherwise (never the global interrupt)."""
        await self._post_empty("/interrupt", {"prompt_id": prompt_id})

    async def cancel_job(self, prompt_id: str) -> bool:
        """Interrupt if running, dequeue if pending; False when finished or unknown."""
        body = await self._json("POST", f"/api/jobs/{quote(prompt_id, safe='')}/cancel")
        return bool(body.get("cancelled")) if isinstance(body, dict) else False

    async def free(self, *, unload_models: bool = False, free_memory: bool = False) -> None:
        await self._post_empty("/free", {"unload_models": unload_models, "free_memory": free_memory})

    async def upload_image(
        self, data: bytes, name: str, *, subfolder: str = "", overwrite: bool = False, kind: str = "input"
    ) -> dict[str, Any]:
        """Upload into the server's ``kind`` folder; returns ``{name, subfolder, type}`` (the name may
        have been changed to avoid a clash). LoadImage then reads ``"subfolder/name"``."""
        fields = {"type": kind, "subfolder": subfolder, "overwrite": "true" if overwrite else "false"}
        response = await self._request("POST", "/upload/image", files={"image": (name, data)}, data=fields)
        if response.status_code != 200:
            raise UnexpectedResponse("POST", "/upload/image", response.status_code, response.text)
        body: dict[str, Any] = response.json()
        return body

    @contextlib.asynccontextmanager
    async def download(
        self, filename: str, subfolder: str = "", kind: str = "output"
    ) -> AsyncIterator[httpx.Response]:
        """Stream a file from ``/view``: ``async with comfy.download(...) as response: async for chunk in
        response.aiter_bytes(): ...``. Raises :class:`OutputNotFound` on 404."""
        http = self._check_open()
        params = {"filename": filename, "subfolder": subfolder, "type": kind}
        try:
            async with http.stream("GET", "/view", params=params) as response:
                if response.status_code == 404:
                    raise OutputNotFound(filename, subfolder, kind)
                if response.status_code != 200:
                    await response.aread()
                    raise UnexpectedResponse("GET", "/view", response.status_code, response.text)
                yield response
        except httpx.ConnectTimeout as exc:
            raise WorkerUnreachable(f"GET {self.base_url}/view: connect timed out") from exc
        except httpx.TimeoutException as exc:
            raise ComfyTimeout(f"GET {self.base_url}/view: no answer within {self._timeout}s") from exc
        except httpx.TransportError as exc:
            raise WorkerUnreachable(f"GET {self.base_url}/view: {type(exc).__name__}: {exc}") from exc

    async def object_info(self, *, refresh: bool = False) -> dict[str, Any]:
        """Every node class of the server (cached after the first call: it is big and slow upstream;
        ``refresh`` reads it again, e.g. after the worker restarted with other custom nodes)."""
        async with self._object_info_lock:
            if self._object_info is None or refresh:
                self._object_info = await self._json("GET", "/object_info")
            return self._object_info

    async def system_stats(self) -> dict[str, Any]:
        """The cheap health probe."""
        body: dict[str, Any] = await self._json("GET", "/system_stats")
        return body

    # -- following a prompt ----------------------------------------------------------------------------
    async def follow(
        self, prompt_id: str, *, on_event: EventCallback | None = None, silence_s: float = 10.0
    ) -> PromptOutcome:
        """Follow ``prompt_id`` to its end and return its outcome, read from its history entry.

        Frames come from the shared socket while it is up and routed to us; otherwise (socket down,
        reconnected under a new id, or silent for ``silence_s``) ``/api/jobs/{id}`` is polled. A queue
        change (``status`` frame) while the prompt has not started also triggers one check, so a prompt
        deleted from the queue is reported lost at once. The outcome is read from the history entry,
        which upstream writes before ``executing{node: null}``: a completion always carries its outputs.
        Raises :class:`PromptLost` when the server no longer knows the prompt and
        :class:`WorkerUnreachable` when it cannot be reached for ``unreachable_after_s``."""
        self._check_open()
        watch = self._watch(prompt_id, None)
        delivered = 0
        poll_delay = self._poll_interval_s
        unreachable_since: float | None = None
        try:
            while True:
                self._check_open()
                watch.changed.clear()
                while delivered < len(watch.events):
                    event = watch.events[delivered]
                    delivered += 1
                    if on_event is not None:
                        result = on_event(event)
                        if inspect.isawaitable(result):
                            await result
                if watch.done:
                    # executing{node: null}: upstream writes history before sending it.
                    entry = await self.history(prompt_id)
                    if entry is not None:
                        return outcome_from_history(prompt_id, entry)
                    if await self.job(prompt_id) is None:
                        raise PromptLost(prompt_id, "finished but its history entry is gone")
                    watch.done = False  # the server still knows it: fall back to polling
                routed = (
                    self._events and watch.client_id is not None and watch.client_id == self._live_client_id
                )
                if routed and watch.queue_changed and not watch.events:
                    # The queue changed while this prompt waited in it. A prompt deleted from the queue
                    # gets no frame of its own, only this status change: ask whether it is still there,
                    # unless its execution_start follows at once (a start's status frame precedes it).
                    watch.queue_changed = False
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_START_GRACE_S):
                            await watch.changed.wait()
                    if watch.events:
                        continue
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(silence_s if routed else poll_delay):
                            await watch.changed.wait()
                    if watch.changed.is_set():
                        continue  # new frames, a queue change or a socket change: look again first
                try:
                    job = await self.job(prompt_id)
                except (WorkerUnreachable, ComfyTimeout):
                    now = time.monotonic()
                    unreachable_since = unreachable_since or now
                    if now - unreachable_since >= self._unreachable_after_s:
                        raise
                    poll_delay = min(poll_delay * 2, self._max_poll_interval_s)
                    continue
                unreachable_since = None
                if job is None:
                    raise PromptLost(
                        prompt_id, "the worker does not know it (restarted, or deleted from its queue)"
                    )
                if job.get("status") in TERMINAL_JOB_STATUSES:
                    entry = await self.history(prompt_id)
                    if entry is not None:
                        return outcome_from_history(prompt_id, entry)
                poll_delay = min(poll_delay * 1.5, self._max_poll_interval_s)
        finally:
            if self._watches.get(prompt_id) is watch:
                del self._watches[prompt_id]

    # -- the WebSocket -------------------------------------------------------------------------------
    def _ws_url(self, client_id: str) -> str:
        scheme, _, rest = self.base_url.partition("://")
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={client_id}"

    async def _run_events(self) -> None:
        backoff = 0.05
        while True:
            # A fresh id per connection: upstream orphans a new socket that reuses a closing one's id.
            client_id = uuid.uuid4().hex
            self.client_id = client_id
            try:
                async with connect(
                    self._ws_url(client_id),
                    open_timeout=min(self._timeout, 10.0),
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
                self._first_attempt.set()
            self.reconnects += 1
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._reconnect_max_s)

    def _set_live(self, client_id: str | None) -> None:
        if self._live_client_id == client_id:
            return
        self._live_client_id = client_id
        self._running_prompt = None
        if client_id is not None:
            self._first_attempt.set()
        for watch in self._watches.values():
            watch.changed.set()  # followers re-decide between frames and polling

    async def _read_frames(self, ws: ClientConnection) -> None:
        async for frame in ws:
            self.last_frame_at = time.monotonic()
            event = parse_text(frame) if isinstance(frame, str) else parse_binary(frame)
            if event is None:
                continue
            self._route(event)

    def _route(self, event: ComfyEvent) -> None:
        prompt_id = event.prompt_id
        if event.type == "status":
            exec_info = (event.data.get("status") or {}).get("exec_info") or {}
            if isinstance(exec_info.get("queue_remaining"), int):
                self.queue_remaining = exec_info["queue_remaining"]
            for waiting in self._watches.values():
                if not waiting.events and waiting.client_id == self._live_client_id:
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
            watch = self._watches.get(prompt_id)
            if watch is not None:
                watch.push(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                logger.exception("comfy_listener_failed url=%s event=%s", self.base_url, event.type)


__all__ = [
    "ComfyClient",
    "PromptOutcome",
    "PromptTimings",
    "QueueItem",
    "QueueState",
    "SubmitResult",
    "outcome_from_history",
]
