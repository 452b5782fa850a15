"""A ComfyUI 0.33 stand-in that speaks the real protocol (see docs/emulator.md).

One aiohttp application serves HTTP and the WebSocket (``routes/``, ``hub.py``); one executor task runs one
prompt at a time from a heap ordered by ``number`` (``executor.py``). Node work is simulated (or done with
Pillow on small images, ``nodes/``), but everything a client can observe follows the measured protocol:
routes and ``/api`` aliases, status codes, bodies, validation errors, WebSocket frames, their order and
their ``clientId`` routing, history written after ``execution_success`` and before the final
``executing{node: null}``.

Counters for tests live under ``/emulator/*``, a namespace real ComfyUI does not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from comfyfleet.emulators.comfyui.executor import Executor
from comfyfleet.emulators.comfyui.nodes import Catalogue
from comfyfleet.emulators.comfyui.options import EmulatorOptions
from comfyfleet.emulators.comfyui.routes import make_app
from comfyfleet.emulators.comfyui.run import Crash
from comfyfleet.emulators.comfyui.state import ComfyState, EmulatorStats

logger = logging.getLogger(__name__)

FOLDER_KINDS = ("input", "output", "temp")


class EmulatorServer:
    """The emulator as an async context manager: a real HTTP + WebSocket server on ``host:port``.

    ``port=0`` picks a free port; ``url`` is known at once, even while a start-up delay keeps the port closed.
    ``on_crash`` is called for an emulated crash (the CLI exits the process there); in-process, a crash
    stops the server until :meth:`restart`.
    """

    def __init__(
        self,
        options: EmulatorOptions | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        on_crash: Callable[[], None] | None = None,
    ) -> None:
        self.options = options or EmulatorOptions()
        self.host = host
        self.port = port
        self.stats = EmulatorStats()
        self.ready = asyncio.Event()
        self.crashed = asyncio.Event()
        self._on_crash = on_crash
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._state_tasks: list[asyncio.Task[None]] = []
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._closed = False
        self.executor = Executor(self)
        self.state = ComfyState()
        self.base_dir = ""
        self.input_dir = self.output_dir = self.temp_dir = ""

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> EmulatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._prepare_folders()
        self.catalogue = Catalogue(self.options, self.input_dir)
        if self.port == 0:
            self.port = _free_port(self.host)
        self._start_state_tasks()
        if self.options.startup_delay_s > 0:
            self.spawn(self._start_http_after(self.options.startup_delay_s), "emulator-startup")
        else:
            await self._start_http()

    def _prepare_folders(self) -> None:
        if self.options.base_dir:
            self.base_dir = os.path.abspath(self.options.base_dir)
        else:
            self._tempdir = tempfile.TemporaryDirectory(prefix="comfyfleet-emulator-")
            self.base_dir = self._tempdir.name
        self.input_dir, self.output_dir, self.temp_dir = (
            os.path.join(self.base_dir, d) for d in FOLDER_KINDS
        )
        for folder in (self.input_dir, self.output_dir, self.temp_dir):
            os.makedirs(folder, exist_ok=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await self._stop_state_tasks()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stop_http(abort=True)
        if self._tempdir is not None:
            self._tempdir.cleanup()

    async def wait_ready(self) -> None:
        await self.ready.wait()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``coro`` as a task owned by the server (cancelled and awaited by :meth:`close`)."""
        # Not a TaskGroup: the server's lifetime spans __aenter__/__aexit__, which test fixtures may run in
        # different tasks.
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("emulator_task_failed task=%s", task.get_name(), exc_info=task.exception())

    async def _start_http_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._start_http()

    async def _start_http(self) -> None:
        runner = web.AppRunner(make_app(self), access_log=None, shutdown_timeout=0.5, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        self._runner = runner
        self.ready.set()
        logger.info("emulator_listening url=%s", self.url)

    async def _stop_http(self, *, abort: bool) -> None:
        runner, self._runner = self._runner, None
        self.ready.clear()
        if runner is None:
            return
        self._abort_connections(runner, abort=abort)
        # Stop listening, let a connection accepted a moment ago finish its set-up, then abort again, so
        # that none that was still arriving is missed (and leaked).
        for site in list(runner.sites):
            await site.stop()
        for _ in range(3):
            await asyncio.sleep(0)
        self._abort_connections(runner, abort=abort)
        await runner.cleanup()

    def _abort_connections(self, runner: web.AppRunner, *, abort: bool) -> None:
        self.state.hub.abort_all()
        if abort and runner.server is not None:
            for connection in list(runner.server.connections):
                if connection.transport is not None:
                    connection.transport.abort()

    def _start_state_tasks(self) -> None:
        # The executor and the socket publisher belong to one state: a restart loses both with it.
        loop = asyncio.get_running_loop()
        self._state_tasks = [
            loop.create_task(self.executor.run_forever(self.state), name="emulator-executor"),
            loop.create_task(self.state.hub.publish_forever(), name="emulator-publisher"),
        ]

    async def _stop_state_tasks(self) -> None:
        tasks, self._state_tasks = self._state_tasks, []
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Crash):
                    await task

    async def restart(self, down_s: float = 0.0) -> None:
        """Lose queue, history, caches and loaded models, drop every socket, like a process restart.

        The new (empty) state is in place when this returns; with ``down_s`` the port stays closed that
        long first."""
        await self.reset_state()
        if down_s > 0 or self._runner is None:
            await self._stop_http(abort=True)
            self.crashed.clear()
            if down_s > 0:
                await asyncio.sleep(down_s)
            await self._start_http()
        logger.info("emulator_restarted down_s=%s", down_s)

    async def restart_later(self, down_s: float) -> None:
        """``POST /emulator/restart``: the empty state at once, the port closed for ``down_s`` afterwards."""
        await self.reset_state()
        if down_s > 0:
            self.spawn(self._down_for(down_s), "emulator-restart")

    async def _down_for(self, seconds: float) -> None:
        await self._stop_http(abort=True)
        await asyncio.sleep(seconds)
        await self._start_http()

    async def crash(self) -> None:
        """The process dies: sockets and connections drop with no final frame, and nothing answers."""
        self.stats.crashes += 1
        logger.warning("emulator_crash prompts_started=%s", self.stats.started_since_restart)
        if self._on_crash is not None:
            self._on_crash()
            return
        self.crashed.set()
        await self._stop_http(abort=True)

    async def disconnect_sockets(self) -> int:
        """Drop every WebSocket (a network blip): execution goes on."""
        return self.state.hub.abort_all()

    async def reset_state(self) -> None:
        self.stats.restarts += 1
        self.stats.started_since_restart = 0
        old = self.state
        self.state = ComfyState()
        await self._stop_state_tasks()
        old.hub.abort_all()
        self._start_state_tasks()

    # -- files ---------------------------------------------------------------------------------------
    def folder(self, kind: str | None) -> str | None:
        return {"input": self.input_dir, "output": self.output_dir, "temp": self.temp_dir}.get(kind or "")

    def annotated_path(self, name: str, default_kind: str) -> str | None:
        """Resolve ``"sub/name.png [input]"`` to an existing file under the right folder, or None."""
        kind = default_kind
        for suffix in FOLDER_KINDS:
            if name.endswith(f" [{suffix}]"):
                name, kind = name[: -len(suffix) - 3], suffix
        root = self.folder(kind)
        if root is None or not name:
            return None
        path = os.path.abspath(os.path.join(root, name))
        if os.path.commonpath((root, path)) != root or not os.path.isfile(path):
            return None
        return path

    # -- observation (comfyfleet only) -----------------------------------------------------------------
    def stats_snapshot(self) -> dict[str, Any]:
        stats, state = self.stats, self.state
        return {
            "prompts_accepted": stats.prompts_accepted,
            "prompts_rejected": stats.prompts_rejected,
            "prompts_started": stats.prompts_started,
            "prompts_succeeded": stats.prompts_succeeded,
            "prompts_failed": stats.prompts_failed,
            "prompts_interrupted": stats.prompts_interrupted,
            "executions": dict(stats.executions),
            "node_executions": dict(stats.node_executions),
            "cached_nodes": stats.cached_nodes,
            "model_loads": stats.model_loads,
            "loaded_models": list(state.loaded_models),
            "restarts": stats.restarts,
            "crashes": stats.crashes,
            "uptime_s": round(time.monotonic() - stats.started_at, 3),
            "queue": {
                "running": [state.running.prompt_id] if state.running else [],
                "pending": [i.prompt_id for i in state.pending()],
            },
            "history_size": len(state.history),
            "websockets": len(state.sockets),
            "options": self.options.public(),
        }


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port
