"""An async client for one ComfyUI server: HTTP calls plus ONE WebSocket that follows every prompt.

Protocol facts this client is built around (see the ComfyUI protocol reference):

* Every WebSocket connection gets a fresh ``clientId``: reusing one can orphan the new socket.
* A prompt is done when ``executing`` arrives with ``node: null`` and its ``prompt_id``; the outcome frames
  (``execution_success`` …) come *before* the history write, so they are never taken as completion.
* Frames for a prompt go only to the socket whose id was given at submit time. After a reconnect (new id)
  those prompts are followed by polling ``/api/jobs/{id}``, as are prompts of a silent socket.
* ``/api/jobs/{id}`` answers 404 for a prompt the server does not know: after a restart, that is a loss.

The socket and its frame routing live in :mod:`comfyfleet.comfy.stream`; the answers as values in
:mod:`comfyfleet.comfy.results` (re-exported here).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Literal
from urllib.parse import quote

import aiohttp

from comfyfleet.comfy.errors import (
    ClientStateError,
    ComfyTimeout,
    PromptLost,
    UnexpectedResponse,
    WorkerUnreachable,
    WorkflowRejected,
)
from comfyfleet.comfy.events import ComfyEvent
from comfyfleet.comfy.results import (
    TERMINAL_JOB_STATUSES,
    PromptOutcome,
    PromptTimings,
    QueueItem,
    QueueState,
    SubmitResult,
    outcome_from_frames,
    outcome_from_history,
)
from comfyfleet.comfy.stream import EventStream, PromptWatch
from comfyfleet.comfy.transport import Answer, Download, Transport

logger = logging.getLogger(__name__)

EventCallback = Callable[[ComfyEvent], Awaitable[None] | None]
# How long a status frame may precede the execution_start of a prompt before a poll checks on it.
_START_GRACE_S = 0.02
# A poll may learn of the end before the socket's last frames of the prompt are read; they follow at once.
_END_FRAMES_GRACE_S = 1.0


class _Handover:
    """Gives a follower's callback every buffered frame of its prompt, once each and in order."""

    __slots__ = ("delivered", "on_event", "watch")

    def __init__(self, watch: PromptWatch, on_event: EventCallback | None) -> None:
        self.watch = watch
        self.on_event = on_event
        self.delivered = 0

    async def deliver(self) -> None:
        while self.delivered < len(self.watch.events):
            event = self.watch.events[self.delivered]
            self.delivered += 1
            if self.on_event is not None:
                result = self.on_event(event)
                if inspect.isawaitable(result):
                    await result


class ComfyClient:
    """One client per ComfyUI server. Use as ``async with ComfyClient(url) as comfy: ...``.

    ``events=False`` skips the WebSocket (health probes, one-off calls); ``follow`` then polls.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        events: bool = True,
        poll_interval_s: float = 0.1,
        max_poll_interval_s: float = 1.0,
        unreachable_after_s: float = 30.0,
        reconnect_max_s: float = 5.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._events = events
        self._poll_interval_s = poll_interval_s
        self._max_poll_interval_s = max_poll_interval_s
        self._unreachable_after_s = unreachable_after_s
        self._http = Transport(self.base_url, timeout)
        self._state: Literal["new", "open", "closed"] = "new"
        self._events_task: asyncio.Task[None] | None = None
        self._stream = EventStream(
            self.base_url, open_timeout_s=min(timeout, 10.0), reconnect_max_s=reconnect_max_s
        )
        self._watches = self._stream.watches  # frames buffered per prompt (tests look at it)
        self._object_info: dict[str, Any] | None = None
        self._object_info_lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------------------------
    async def __aenter__(self) -> ComfyClient:
        if self._state != "new":
            raise ClientStateError(f"ComfyClient for {self.base_url} cannot be opened twice")
        self._http.open()
        self._state = "open"
        if self._events:
            # Owned by this client and cancelled and awaited in close(); not a TaskGroup because the
            # client's lifetime spans __aenter__/__aexit__, which callers may run in different tasks.
            self._events_task = asyncio.get_running_loop().create_task(
                self._stream.run(), name=f"comfy-events {self.base_url}"
            )
            # Give the first connection a moment so the first submit is routed to a live socket.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(self._timeout, 5.0)):
                    await self._stream.first_attempt.wait()
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
        self._stream.wake_all()
        await self._http.close()

    def _check_open(self) -> Transport:
        if self._state != "open":
            raise ClientStateError(
                f"ComfyClient for {self.base_url} is {'closed' if self._state == 'closed' else 'not open yet'}"
            )
        return self._http

    @property
    def client_id(self) -> str:
        """The ``clientId`` of the socket (a fresh one per connection); prompts are routed to it."""
        return self._stream.client_id

    @property
    def connected(self) -> bool:
        """Whether the WebSocket is open right now (under ``client_id``)."""
        return self._stream.connected

    @property
    def reconnects(self) -> int:
        return self._stream.reconnects

    @property
    def queue_remaining(self) -> int | None:
        """The server's queue length, as its last ``status`` frame told."""
        return self._stream.queue_remaining

    @property
    def last_frame_at(self) -> float | None:
        """``time.monotonic()`` of the last frame received."""
        return self._stream.last_frame_at

    def add_listener(self, callback: Callable[[ComfyEvent], None]) -> Callable[[], None]:
        """Call ``callback`` for every frame (``status`` included); returns a function that removes it."""
        return self._stream.add_listener(callback)

    async def _request(self, method: str, path: str, *, body: Any = None) -> Answer:
        return await self._check_open().request(method, path, body=body)

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        return await self._check_open().json(method, path, body)

    async def _post_empty(self, path: str, body: dict[str, Any]) -> None:
        await self._check_open().post_empty(path, body)

    # -- prompts -------------------------------------------------------------------------------------
    def forget(self, prompt_id: str) -> None:
        """Drop buffered frames of a prompt that will not be followed."""
        self._stream.forget(prompt_id)

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
        self._stream.watch(prompt_id, routed_to)  # before the POST: frames may arrive before its answer
        try:
            response = await self._request("POST", "/prompt", body=payload)
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

    def delete_history_later(self, prompt_id: str) -> None:
        """Delete a finished prompt's history entry soon, with others in one call (a call per task would
        cost both sides more than the rest of collecting it). Failures are ignored: upstream trims its
        history itself. ``close()`` sends what is still waiting."""
        self._check_open().delete_history_later(prompt_id)

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
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name, content_type="application/octet-stream")
        form.add_field("type", kind)
        form.add_field("subfolder", subfolder)
        form.add_field("overwrite", "true" if overwrite else "false")
        response = await self._check_open().request("POST", "/upload/image", data=form)
        if response.status_code != 200:
            raise UnexpectedResponse("POST", "/upload/image", response.status_code, response.text)
        body: dict[str, Any] = response.json()
        return body

    @contextlib.asynccontextmanager
    async def download(
        self, filename: str, subfolder: str = "", kind: str = "output"
    ) -> AsyncIterator[Download]:
        """Stream a file from ``/view``: ``async with comfy.download(...) as file: async for chunk in
        file.chunks: ...``. Raises :class:`OutputNotFound` on 404."""
        async with self._check_open().download(filename, subfolder, kind) as file:
            yield file

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
        self,
        prompt_id: str,
        *,
        on_event: EventCallback | None = None,
        silence_s: float = 10.0,
        from_frames: bool = False,
    ) -> PromptOutcome:
        """Follow ``prompt_id`` to its end and return its outcome, read from its history entry.

        Frames come from the shared socket while it is up and routed to us; otherwise (socket down,
        reconnected under a new id, or silent for ``silence_s``) ``/api/jobs/{id}`` is polled. A queue
        change (``status`` frame) while the prompt has not started also triggers one check, so a prompt
        deleted from the queue is reported lost at once. The outcome is read from the history entry,
        which upstream writes before ``executing{node: null}``: a completion always carries its outputs.
        ``on_event`` gets every frame of the prompt before this returns, however the end was learned.
        ``from_frames``: a success whose every frame came over the socket this client submitted it on (no
        reconnect since) is read from those frames, without the history round trip (see
        :func:`~comfyfleet.comfy.results.outcome_from_frames`); anything else still reads the history.
        Raises :class:`PromptLost` when the server no longer knows the prompt and
        :class:`WorkerUnreachable` when it cannot be reached for ``unreachable_after_s``."""
        self._check_open()
        watch = self._stream.watch(prompt_id, None)
        handover = _Handover(watch, on_event)
        try:
            outcome = await self._follow_to_end(watch, handover, silence_s, from_frames)
            await handover.deliver()
            return outcome
        finally:
            self._stream.release(watch)

    async def _follow_to_end(
        self, watch: PromptWatch, handover: _Handover, silence_s: float, from_frames: bool
    ) -> PromptOutcome:
        prompt_id = watch.prompt_id
        poll_delay = self._poll_interval_s
        unreachable_since: float | None = None
        while True:
            self._check_open()
            watch.changed.clear()
            await handover.deliver()
            if watch.done:
                framed = (
                    outcome_from_frames(prompt_id, watch.events)
                    if from_frames and self._stream.routed(watch)
                    else None
                )
                if framed is not None:
                    return framed
                # executing{node: null}: upstream writes history before sending it.
                outcome = await self._outcome_of_done(prompt_id)
                if outcome is not None:
                    return outcome
                watch.done = False  # the server still knows it: fall back to polling
            routed = self._events and self._stream.routed(watch)
            if not await self._time_to_poll(watch, routed, silence_s if routed else poll_delay):
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
                    if routed:
                        await self._end_frames(watch)
                    return outcome_from_history(prompt_id, entry)
            poll_delay = min(poll_delay * 1.5, self._max_poll_interval_s)

    async def _outcome_of_done(self, prompt_id: str) -> PromptOutcome | None:
        entry = await self.history(prompt_id)
        if entry is not None:
            return outcome_from_history(prompt_id, entry)
        if await self.job(prompt_id) is None:
            raise PromptLost(prompt_id, "finished but its history entry is gone")
        return None

    async def _time_to_poll(self, watch: PromptWatch, routed: bool, wait_s: float) -> bool:
        """Wait for frames; True when ``/api/jobs`` should be asked now, False to look at new frames first."""
        if routed and watch.queue_changed and not watch.events:
            # The queue changed while this prompt waited in it. A prompt deleted from the queue gets no
            # frame of its own, only this status change: ask whether it is still there, unless its
            # execution_start follows at once (a start's status frame precedes it).
            watch.queue_changed = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_START_GRACE_S):
                    await watch.changed.wait()
            return not watch.events
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await watch.changed.wait()
        return not watch.changed.is_set()

    async def _end_frames(self, watch: PromptWatch) -> None:
        """A poll found the prompt ended: its last frames, up to ``executing{node: null}``, are on their way
        over the socket (real ComfyUI sends two ``status`` frames before ``execution_start``, and a fast
        prompt can finish while the poll they triggered is answered). Wait briefly for them."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_END_FRAMES_GRACE_S):
                while not watch.done and self._stream.routed(watch):
                    watch.changed.clear()
                    await watch.changed.wait()


__all__ = [
    "ComfyClient",
    "Download",
    "PromptOutcome",
    "PromptTimings",
    "QueueItem",
    "QueueState",
    "SubmitResult",
    "outcome_from_history",
]
