"""``comfyfleet.Client`` (blocking) and ``comfyfleet.AsyncClient`` (asyncio): submit workflows, follow
them live, wait for them, cancel them and download their outputs.

Both speak the REST API (``/api/v1``) over httpx. The server URL and API key come from the arguments,
else ``COMFYFLEET_URL`` / ``COMFYFLEET_API_KEY``, else the client config file
(``~/.config/comfyfleet/client.yaml`` with ``url:`` and ``api_key:``), else ``http://127.0.0.1:8080``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from comfyfleet.sdk import _core
from comfyfleet.sdk._core import InputFiles
from comfyfleet.sdk.errors import ServerUnreachable, WaitTimeout
from comfyfleet.sdk.models import Output, Task, TaskEvent, TaskPage

EventCallback = Callable[[TaskEvent], Any]

# A dropped event stream is reopened after this long (doubling up to the cap) while waiting.
_RECONNECT_S = 0.2
_RECONNECT_MAX_S = 5.0
_STREAM_READ_TIMEOUT_S = 60.0  # the server pings every 15 s
# run() first lets the server hold the submission until the task ends (POST ?wait=), for at most this long:
# short enough that proxies between here and the server do not cut an idle request.
_SERVER_WAIT_S = 50.0


def _submit_request(wait: float | None, connect_timeout: float | None) -> dict[str, Any]:
    if not wait or wait <= 0:
        return {}
    return {"params": {"wait": round(wait, 3)}, "timeout": httpx.Timeout(connect_timeout, read=wait + 30)}


def _outputs_of(task_or_outputs: Task | Sequence[Output]) -> list[Output]:
    return task_or_outputs.outputs if isinstance(task_or_outputs, Task) else list(task_or_outputs)


class AsyncClient:
    """The comfyfleet API for asyncio code. Use it as ``async with AsyncClient() as fleet: ...``.

    ``transport`` lets tests (or an embedding app) pass an httpx transport, e.g. ``httpx.ASGITransport``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url, api_key = _core.resolve_connection(url, api_key)
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=_core.default_headers(api_key), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _core.unreachable(self.url, exc) from exc
        return _core.decode(response)

    # -- tasks ----------------------------------------------------------------------------------
    async def submit(
        self,
        workflow: Mapping[str, Any],
        *,
        priority: int = 0,
        workflow_id: str | None = None,
        pool: str | None = None,
        inputs: InputFiles | None = None,
        models: Sequence[Mapping[str, Any]] | None = None,
        webhook: str | Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        max_retries: int | None = None,
        timeout_s: float | None = None,
        idempotency_key: str | None = None,
        wait: float | None = None,
    ) -> Task:
        """Queue ``workflow`` (an API-format graph). ``inputs`` maps a file name used in the graph (e.g.
        ``LoadImage.image``) to a path, bytes or an http(s) URL; the file is placed on the worker. ``models``:
        model files the task brings (``{url, sha256, folder, name}``, docs/models.md).
        ``wait``: let the server answer only when the task ended, or after that many seconds."""
        body = _core.submission(
            workflow,
            priority=priority,
            workflow_id=workflow_id,
            pool=pool,
            inputs=inputs,
            models=models,
            webhook=webhook,
            metadata=metadata,
            max_retries=max_retries,
            timeout_s=timeout_s,
        )
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        extra = _submit_request(wait, self._http.timeout.connect)
        return Task.from_json(await self._call("POST", "/api/v1/tasks", json=body, headers=headers, **extra))

    async def get(self, task_id: str) -> Task:
        return Task.from_json(await self._call("GET", _core.task_path(task_id)))

    async def list_tasks(
        self,
        *,
        status: str | Sequence[str] | None = None,
        workflow_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        include_payload: bool = False,
    ) -> TaskPage:
        """One page of tasks, newest first; pass ``page.next_cursor`` for the next one. Tasks come without
        their workflow graph (``task.payload`` is None) unless ``include_payload``; a page may then hold fewer
        than ``limit`` tasks (the server's byte budget per answer), with a ``next_cursor`` to go on."""
        params = _core.list_params(status, workflow_id, limit, cursor, include_payload)
        return _core.task_page(await self._call("GET", "/api/v1/tasks", params=params))

    async def cancel(self, task_id: str) -> Task:
        """Cancel a task: a pending one at once, a running one is stopped on its worker shortly."""
        return Task.from_json(await self._call("DELETE", _core.task_path(task_id)))

    async def set_priority(self, task_id: str, priority: int) -> Task:
        """Move a pending task up or down the queue; the answer has its new ``queue_position``."""
        return Task.from_json(
            await self._call("PATCH", _core.task_path(task_id), json={"priority": priority})
        )

    async def events(self, task_id: str) -> AsyncIterator[TaskEvent]:
        """The task's live events: first a ``snapshot``, then ``queue_position``, ``status`` and ``progress``
        events; it ends after the event that makes the task completed, failed or cancelled."""
        timeout = httpx.Timeout(self._http.timeout.connect, read=_STREAM_READ_TIMEOUT_S)
        try:
            async with self._http.stream(
                "GET",
                f"{_core.task_path(task_id)}/events",
                headers={"Accept": "text/event-stream"},
                timeout=timeout,
            ) as response:
                if not response.is_success:
                    await response.aread()
                    _core.decode(response)
                decoder = _core.SSEDecoder()
                async for line in response.aiter_lines():
                    event = decoder.feed(line)
                    if event is not None:
                        yield event
                        if event.is_terminal:
                            return
        except httpx.TransportError as exc:
            raise _core.unreachable(self.url, exc) from exc

    async def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the same call as the blocking client's
        on_event: EventCallback | None = None,
    ) -> Task:
        """Wait until the task ends and return it (completed, failed or cancelled: check ``task.ok`` or
        call ``task.raise_for_status()``). Follows the live event stream, reconnecting if it drops.
        ``on_event`` sees every event (it may be a coroutine function). Raises
        :class:`~comfyfleet.sdk.errors.WaitTimeout` after ``timeout`` seconds; the task keeps running."""
        try:
            async with asyncio.timeout(timeout):
                return await self._follow(task_id, on_event)
        except TimeoutError:
            raise WaitTimeout(task_id, timeout or 0.0) from None

    async def _follow(self, task_id: str, on_event: EventCallback | None) -> Task:
        delay = _RECONNECT_S
        while True:
            try:
                async for event in self.events(task_id):
                    delay = _RECONNECT_S
                    if on_event is not None:
                        outcome = on_event(event)
                        if isinstance(outcome, Awaitable):
                            await outcome
                    if event.is_terminal:
                        return await self.get(task_id)
                # The stream ended without an ending (a restart, a proxy): look, then follow again.
                task = await self.get(task_id)
                if task.is_terminal:
                    return task
            except ServerUnreachable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_S)

    async def run(
        self,
        workflow: Mapping[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the same call as the blocking client's
        on_event: EventCallback | None = None,
        **submit_options: Any,
    ) -> Task:
        """Submit ``workflow`` and wait for it to end (see :meth:`submit` and :meth:`wait`). Without
        ``on_event``, a short task is answered by the submission itself (the server holds it until the end)."""
        started = time.monotonic()
        if on_event is None and "wait" not in submit_options:
            submit_options["wait"] = min(timeout, _SERVER_WAIT_S) if timeout is not None else _SERVER_WAIT_S
        task = await self.submit(workflow, **submit_options)
        if task.is_terminal:
            return task
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        return await self.wait(task.id, timeout=remaining, on_event=on_event)

    # -- outputs --------------------------------------------------------------------------------
    async def read_output(self, output: Output | str) -> bytes:
        """The bytes of one output (an :class:`Output` or its ``url``)."""
        url = output.url if isinstance(output, Output) else output
        try:
            response = await self._http.get(url)
        except httpx.TransportError as exc:
            raise _core.unreachable(self.url, exc) from exc
        if not response.is_success:
            _core.decode(response)
        return response.content

    async def download(
        self, task: Task | str | Sequence[Output], directory: str | os.PathLike[str] = "."
    ) -> list[Path]:
        """Save a task's output files into ``directory`` (created if needed); return their paths."""
        if isinstance(task, str):
            task = await self.get(task)
        target_dir = Path(directory)
        await asyncio.to_thread(target_dir.mkdir, parents=True, exist_ok=True)
        saved = []
        for output in _outputs_of(task):
            target = _core.output_target(target_dir, output.filename)
            partial = target.with_name(f".{target.name}.partial")
            try:
                async with self._http.stream("GET", output.url) as response:
                    if not response.is_success:
                        await response.aread()
                        _core.decode(response)
                    handle = await asyncio.to_thread(partial.open, "wb")
                    try:
                        async for chunk in response.aiter_bytes():
                            await asyncio.to_thread(handle.write, chunk)
                    finally:
                        await asyncio.to_thread(handle.close)
            except httpx.TransportError as exc:
                await asyncio.to_thread(partial.unlink, missing_ok=True)
                raise _core.unreachable(self.url, exc) from exc
            await asyncio.to_thread(partial.replace, target)
            saved.append(target)
        return saved

    # -- fleet ----------------------------------------------------------------------------------
    async def workers(self) -> list[dict[str, Any]]:
        body = await self._call("GET", "/api/v1/workers")
        return list(body.get("workers", [])) if isinstance(body, dict) else []

    async def drain_worker(self, worker_id: str) -> dict[str, Any]:
        """Let a worker finish what it holds, take nothing new, then stop."""
        body = await self._call("POST", f"/api/v1/workers/{worker_id}/drain")
        return body if isinstance(body, dict) else {}

    async def undrain_worker(self, worker_id: str) -> dict[str, Any]:
        """Give a draining worker tasks again (the way back for a drained static worker)."""
        body = await self._call("POST", f"/api/v1/workers/{worker_id}/undrain")
        return body if isinstance(body, dict) else {}

    async def models(self) -> dict[str, Any]:
        """The host's model cache and the pools' manifests (``GET /api/v1/models``, docs/models.md)."""
        body = await self._call("GET", "/api/v1/models")
        return body if isinstance(body, dict) else {}

    async def queue_metrics(self) -> dict[str, Any]:
        body = await self._call("GET", "/api/v1/queue/metrics")
        return body if isinstance(body, dict) else {}

    async def validate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Check a workflow against the fleet without running it (``POST /api/v1/workflows/validate``): the
        report has ``valid``, ``missing_node_types``, ComfyUI's ``error`` and ``node_errors``, and ``models``."""
        body = await self._call("POST", "/api/v1/workflows/validate", json={"payload": payload})
        return body if isinstance(body, dict) else {}


class Client:
    """The comfyfleet API for ordinary (blocking) code. Use it as ``with Client() as fleet: ...``.

    ``transport`` lets tests (or an embedding app) pass an httpx transport.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url, api_key = _core.resolve_connection(url, api_key)
        self._http = httpx.Client(
            base_url=self.url, headers=_core.default_headers(api_key), timeout=timeout, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _core.unreachable(self.url, exc) from exc
        return _core.decode(response)

    # -- tasks ----------------------------------------------------------------------------------
    def submit(
        self,
        workflow: Mapping[str, Any],
        *,
        priority: int = 0,
        workflow_id: str | None = None,
        pool: str | None = None,
        inputs: InputFiles | None = None,
        models: Sequence[Mapping[str, Any]] | None = None,
        webhook: str | Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        max_retries: int | None = None,
        timeout_s: float | None = None,
        idempotency_key: str | None = None,
        wait: float | None = None,
    ) -> Task:
        """Queue ``workflow`` (an API-format graph). ``inputs`` maps a file name used in the graph (e.g.
        ``LoadImage.image``) to a path, bytes or an http(s) URL; the file is placed on the worker. ``models``:
        model files the task brings (``{url, sha256, folder, name}``, docs/models.md).
        ``wait``: let the server answer only when the task ended, or after that many seconds."""
        body = _core.submission(
            workflow,
            priority=priority,
            workflow_id=workflow_id,
            pool=pool,
            inputs=inputs,
            models=models,
            webhook=webhook,
            metadata=metadata,
            max_retries=max_retries,
            timeout_s=timeout_s,
        )
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        extra = _submit_request(wait, self._http.timeout.connect)
        return Task.from_json(self._call("POST", "/api/v1/tasks", json=body, headers=headers, **extra))

    def get(self, task_id: str) -> Task:
        return Task.from_json(self._call("GET", _core.task_path(task_id)))

    def list_tasks(
        self,
        *,
        status: str | Sequence[str] | None = None,
        workflow_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        include_payload: bool = False,
    ) -> TaskPage:
        """One page of tasks, newest first; pass ``page.next_cursor`` for the next one. Tasks come without
        their workflow graph (``task.payload`` is None) unless ``include_payload``; a page may then hold fewer
        than ``limit`` tasks (the server's byte budget per answer), with a ``next_cursor`` to go on."""
        params = _core.list_params(status, workflow_id, limit, cursor, include_payload)
        return _core.task_page(self._call("GET", "/api/v1/tasks", params=params))

    def cancel(self, task_id: str) -> Task:
        """Cancel a task: a pending one at once, a running one is stopped on its worker shortly."""
        return Task.from_json(self._call("DELETE", _core.task_path(task_id)))

    def set_priority(self, task_id: str, priority: int) -> Task:
        """Move a pending task up or down the queue; the answer has its new ``queue_position``."""
        return Task.from_json(self._call("PATCH", _core.task_path(task_id), json={"priority": priority}))

    def events(self, task_id: str, *, read_timeout: float = _STREAM_READ_TIMEOUT_S) -> Iterator[TaskEvent]:
        """The task's live events: first a ``snapshot``, then ``queue_position``, ``status`` and ``progress``
        events; it ends after the event that makes the task completed, failed or cancelled."""
        timeout = httpx.Timeout(self._http.timeout.connect, read=read_timeout)
        try:
            with self._http.stream(
                "GET",
                f"{_core.task_path(task_id)}/events",
                headers={"Accept": "text/event-stream"},
                timeout=timeout,
            ) as response:
                if not response.is_success:
                    response.read()
                    _core.decode(response)
                decoder = _core.SSEDecoder()
                for line in response.iter_lines():
                    event = decoder.feed(line)
                    if event is not None:
                        yield event
                        if event.is_terminal:
                            return
        except httpx.TransportError as exc:
            raise _core.unreachable(self.url, exc) from exc

    def wait(
        self, task_id: str, *, timeout: float | None = None, on_event: EventCallback | None = None
    ) -> Task:
        """Wait until the task ends and return it (completed, failed or cancelled: check ``task.ok`` or
        call ``task.raise_for_status()``). Follows the live event stream, reconnecting if it drops.
        ``on_event`` sees every event. Raises :class:`~comfyfleet.sdk.errors.WaitTimeout` after
        ``timeout`` seconds; the task keeps running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _RECONNECT_S
        while True:
            remaining = _STREAM_READ_TIMEOUT_S if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(task_id, timeout or 0.0)
            try:
                # The read timeout bounds the wait even while no event arrives.
                for event in self.events(task_id, read_timeout=min(remaining, _STREAM_READ_TIMEOUT_S)):
                    delay = _RECONNECT_S
                    if on_event is not None:
                        on_event(event)
                    if event.is_terminal:
                        return self.get(task_id)
                    if deadline is not None and time.monotonic() >= deadline:
                        raise WaitTimeout(task_id, timeout or 0.0)
                task = self.get(task_id)
                if task.is_terminal:
                    return task
            except ServerUnreachable:
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(task_id, timeout or 0.0) from None
                time.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_S)

    def run(
        self,
        workflow: Mapping[str, Any],
        *,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
        **submit_options: Any,
    ) -> Task:
        """Submit ``workflow`` and wait for it to end (see :meth:`submit` and :meth:`wait`). Without
        ``on_event``, a short task is answered by the submission itself (the server holds it until the end)."""
        started = time.monotonic()
        if on_event is None and "wait" not in submit_options:
            submit_options["wait"] = min(timeout, _SERVER_WAIT_S) if timeout is not None else _SERVER_WAIT_S
        task = self.submit(workflow, **submit_options)
        if task.is_terminal:
            return task
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        return self.wait(task.id, timeout=remaining, on_event=on_event)

    # -- outputs --------------------------------------------------------------------------------
    def read_output(self, output: Output | str) -> bytes:
        """The bytes of one output (an :class:`Output` or its ``url``)."""
        url = output.url if isinstance(output, Output) else output
        try:
            response = self._http.get(url)
        except httpx.TransportError as exc:
            raise _core.unreachable(self.url, exc) from exc
        if not response.is_success:
            _core.decode(response)
        return response.content

    def download(
        self, task: Task | str | Sequence[Output], directory: str | os.PathLike[str] = "."
    ) -> list[Path]:
        """Save a task's output files into ``directory`` (created if needed); return their paths."""
        if isinstance(task, str):
            task = self.get(task)
        target_dir = Path(directory)
        target_dir.mkdir(parents=True, exist_ok=True)
        saved = []
        for output in _outputs_of(task):
            target = _core.output_target(target_dir, output.filename)
            partial = target.with_name(f".{target.name}.partial")
            try:
                with self._http.stream("GET", output.url) as response:
                    if not response.is_success:
                        response.read()
                        _core.decode(response)
                    with partial.open("wb") as handle:
                        for chunk in response.iter_bytes():
                            handle.write(chunk)
            except httpx.TransportError as exc:
                partial.unlink(missing_ok=True)
                raise _core.unreachable(self.url, exc) from exc
            partial.replace(target)
            saved.append(target)
        return saved

    # -- fleet ----------------------------------------------------------------------------------
    def workers(self) -> list[dict[str, Any]]:
        body = self._call("GET", "/api/v1/workers")
        return list(body.get("workers", [])) if isinstance(body, dict) else []

    def drain_worker(self, worker_id: str) -> dict[str, Any]:
        """Let a worker finish what it holds, take nothing new, then stop."""
        body = self._call("POST", f"/api/v1/workers/{worker_id}/drain")
        return body if isinstance(body, dict) else {}

    def undrain_worker(self, worker_id: str) -> dict[str, Any]:
        """Give a draining worker tasks again (the way back for a drained static worker)."""
        body = self._call("POST", f"/api/v1/workers/{worker_id}/undrain")
        return body if isinstance(body, dict) else {}

    def models(self) -> dict[str, Any]:
        """The host's model cache and the pools' manifests (``GET /api/v1/models``, docs/models.md)."""
        body = self._call("GET", "/api/v1/models")
        return body if isinstance(body, dict) else {}

    def queue_metrics(self) -> dict[str, Any]:
        body = self._call("GET", "/api/v1/queue/metrics")
        return body if isinstance(body, dict) else {}

    def validate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Check a workflow against the fleet without running it (``POST /api/v1/workflows/validate``): the
        report has ``valid``, ``missing_node_types``, ComfyUI's ``error`` and ``node_errors``, and ``models``."""
        body = self._call("POST", "/api/v1/workflows/validate", json={"payload": payload})
        return body if isinstance(body, dict) else {}
