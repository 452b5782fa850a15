"""A ComfyUI 0.33 stand-in that speaks the real protocol (see docs/emulator.md).

One aiohttp application serves HTTP and the WebSocket; one executor task runs one prompt at a time from a
heap ordered by ``number``. Node work is simulated (or done with Pillow on small images), but everything a
client can observe follows the measured protocol: routes and ``/api`` aliases, status codes, bodies,
validation errors, WebSocket frames, their order and their ``clientId`` routing, history written after
``execution_success`` and before the final ``executing{node: null}``.

Counters for tests live under ``/emulator/*``, a namespace real ComfyUI does not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import io
import json
import logging
import math
import os
import platform
import random
import socket
import struct
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

from aiohttp import WSMsgType, web
from PIL import Image

from comfyfleet.comfy import workflow
from comfyfleet.comfy.emulator.nodes import NODES_BY_NAME, Catalogue, Latent, Model, NodeFailed
from comfyfleet.comfy.emulator.options import MODEL_EXTENSIONS, EmulatorOptions, OptionsError
from comfyfleet.comfy.errors import MalformedPrompt

logger = logging.getLogger(__name__)

COMFYUI_VERSION = "0.33.0"
MAX_HISTORY = 10_000
SENSITIVE_EXTRA_DATA_KEYS = ("api_key_comfy_org", "auth_token_comfy_org")
JOB_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
FEATURES = {
    "supports_preview_metadata": True,
    "supports_model_type_tags": True,
    "max_upload_size": 104857600,
    "extension": {"manager": {"supports_v4": True}},
    "node_replacements": True,
    "assets": False,
}
_CACHE_ENTRIES = 64
_OOM_MESSAGE = (
    "Allocation on device 0 would exceed allowed memory. (out of memory)\n"
    "Currently allocated     : 21.47 GiB\n"
    "Requested               : 2.25 GiB\n"
    "Device limit            : 23.64 GiB\n"
    "Free (according to CUDA): 19.81 MiB\n"
    "PyTorch limit (set by user-supplied memory fraction)\n"
    "                        : 17179869184.00 GiB"
)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _server_error() -> web.Response:
    """What aiohttp answers when a ComfyUI handler raises (bad JSON and friends)."""
    return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")


class _Interrupted(Exception):
    def __init__(self, node_id: str | None) -> None:
        super().__init__(node_id)
        self.node_id = node_id


class _Crash(Exception):
    """Raised inside the executor to emulate the process dying mid-prompt."""


@dataclass(slots=True)
class _QueueItem:
    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    sensitive: dict[str, Any]

    def wire(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass(slots=True)
class _Socket:
    ws: web.WebSocketResponse
    request: web.Request
    metadata_previews: bool = False

    def abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()


@dataclass(slots=True)
class EmulatorStats:
    """Observer counters. They survive an emulated restart (``/emulator/restart``), not a crash of the process."""

    started_at: float = field(default_factory=time.monotonic)
    prompts_accepted: int = 0
    prompts_rejected: int = 0
    prompts_started: int = 0
    prompts_succeeded: int = 0
    prompts_failed: int = 0
    prompts_interrupted: int = 0
    executions: dict[str, int] = field(default_factory=dict)
    node_executions: dict[str, int] = field(default_factory=dict)
    cached_nodes: int = 0
    model_loads: int = 0
    restarts: int = 0
    crashes: int = 0
    started_since_restart: int = 0


class ComfyState:
    """Everything a ComfyUI process keeps in memory, and so loses on restart."""

    def __init__(self) -> None:
        self.number = 0
        self.heap: list[tuple[float, int, _QueueItem]] = []
        self.sequence = 0
        self.running: _QueueItem | None = None
        self.history: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.cache: OrderedDict[str, tuple[tuple[Any, ...], dict[str, Any] | None]] = OrderedDict()
        self.loaded_models: OrderedDict[str, None] = OrderedDict()
        self.sockets: dict[str, _Socket] = {}
        self.client_id: str | None = None  # of the running prompt
        self.last_node_id: str | None = None
        self.interrupted = False
        self.interrupt_event = asyncio.Event()
        self.work = asyncio.Event()
        self.pending_free: dict[str, bool] = {}

    def queue_remaining(self) -> int:
        return len(self.heap) + (1 if self.running is not None else 0)

    def pending(self) -> list[_QueueItem]:
        return [entry[2] for entry in self.heap]  # heap order, as upstream returns it

    def put(self, item: _QueueItem) -> None:
        self.sequence += 1
        heapq.heappush(self.heap, (item.number, self.sequence, item))
        self.work.set()

    def remove_pending(self, predicate: Callable[[_QueueItem], bool]) -> int:
        kept = [entry for entry in self.heap if not predicate(entry[2])]
        removed = len(self.heap) - len(kept)
        if removed:
            heapq.heapify(kept)
            self.heap = kept
        return removed

    def interrupt(self) -> None:
        self.interrupted = True
        self.interrupt_event.set()

    def free(self, unload_models: bool, free_memory: bool) -> None:
        if unload_models or free_memory:
            self.loaded_models.clear()
        if free_memory:
            self.cache.clear()


class _Run:
    """One prompt being executed: the RunContext the nodes see, and the frames it sends."""

    def __init__(self, server: EmulatorServer, state: ComfyState, item: _QueueItem) -> None:
        self.server = server
        self.state = state
        self.item = item
        self.options = server.options
        self.prompt: Mapping[str, Any] = item.prompt
        self.extra_data: Mapping[str, Any] = item.extra_data
        self.prompt_id = item.prompt_id
        self.client_id: str | None = item.extra_data.get("client_id")
        self.node_id = ""
        self.messages: list[list[Any]] = []
        self.node_states: dict[str, dict[str, Any]] = {}
        self.last_progress = (0.0, -1)

    # -- frames --
    async def send(self, event: str, data: dict[str, Any], *, to_client_only: bool = False) -> None:
        """``send_sync(event, data, client_id)``: to the prompt's socket, or to all when it has none.
        ``to_client_only`` is upstream's ``add_message(broadcast=False)``: nothing when there is no client."""
        if self.client_id is None and to_client_only:
            return
        await self.server.send_json(self.state, event, data, self.client_id)

    async def add_message(self, event: str, data: dict[str, Any], *, broadcast: bool) -> None:
        data = {**data, "timestamp": _now_ms()}
        self.messages.append([event, data])
        await self.send(event, data, to_client_only=not broadcast)

    async def progress_state(self, node_id: str, state: str, value: float = 0, maximum: float = 1) -> None:
        self.node_states[node_id] = {
            "value": value,
            "max": maximum,
            "state": state,
            "node_id": node_id,
            "prompt_id": self.prompt_id,
            "display_node_id": node_id,
            "parent_node_id": None,
            "real_node_id": node_id,
        }
        await self.send("progress_state", {"prompt_id": self.prompt_id, "nodes": dict(self.node_states)})

    # -- RunContext --
    def check_interrupt(self) -> None:
        if self.state.interrupted:
            self.state.interrupted = False
            raise _Interrupted(self.node_id or None)

    async def interruptible_sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.check_interrupt()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.state.interrupt_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.state.interrupt_event.wait(), remaining)

    async def step(self, value: int, total: int) -> None:
        if self.options.step_time_s:
            await self.interruptible_sleep(self.options.step_time_s)
        self.check_interrupt()
        now = time.monotonic()
        last_time, last_value = self.last_progress
        # Upstream throttles progress to one per 100 ms and 0.5 %, always sending the first and the last.
        if (
            last_value < 0
            or value >= total
            or (now - last_time >= 0.1 and (value - last_value) / max(total, 1) >= 0.005)
        ):
            self.last_progress = (now, value)
            await self.send(
                "progress", {"value": value, "max": total, "prompt_id": self.prompt_id, "node": self.node_id}
            )
            await self.progress_state(self.node_id, "running", value, total)
            if self.options.previews and self.prompt[self.node_id]["class_type"] == "KSampler":
                seed = f"{self.prompt_id}:{value}"
                image = Image.frombytes("RGB", (2, 2), hashlib.sha256(seed.encode()).digest()[:12]).resize(
                    (64, 64)
                )
                await self.send_image(image, "JPEG")

    async def load_model(self, folder: str, name: str) -> None:
        key = f"{folder}/{name}"
        loaded = self.state.loaded_models
        if key in loaded:
            loaded.move_to_end(key)
            return
        if self.options.model_load_s:
            await asyncio.sleep(self.options.model_load_s)  # loading ignores interrupts, as upstream
        loaded[key] = None
        self.server.stats.model_loads += 1
        while len(loaded) > self.options.model_cache_size:
            loaded.popitem(last=False)

    async def cpu(self, pixels: int, work: Callable[[], Any]) -> Any:
        if pixels > 256 * 256:
            return await asyncio.to_thread(work)
        return work()

    def output_dir(self) -> str:
        return self.server.output_dir

    def temp_dir(self) -> str:
        return self.server.temp_dir

    def input_path(self, name: str) -> str | None:
        return self.server.annotated_path(name, "input")

    async def send_image(self, image: Image.Image, image_format: str) -> None:
        buffer = io.BytesIO()
        image.save(
            buffer,
            format=image_format,
            **({"quality": 95} if image_format == "JPEG" else {"compress_level": 1}),
        )
        await self.server.send_preview(
            self.state, buffer.getvalue(), image_format, self.prompt_id, self.node_id, self.client_id
        )


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
        self._executor: asyncio.Task[None] | None = None
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._closed = False
        self._rng = random.Random(self.options.seed)
        self._rng_seed = self.options.seed
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
        self._start_executor()
        if self.options.startup_delay_s > 0:
            self._spawn(self._start_http_after(self.options.startup_delay_s), "emulator-startup")
        else:
            await self._start_http()

    def _prepare_folders(self) -> None:
        if self.options.base_dir:
            self.base_dir = os.path.abspath(self.options.base_dir)
        else:
            self._tempdir = tempfile.TemporaryDirectory(prefix="comfyfleet-emulator-")
            self.base_dir = self._tempdir.name
        self.input_dir, self.output_dir, self.temp_dir = (
            os.path.join(self.base_dir, d) for d in ("input", "output", "temp")
        )
        for folder in (self.input_dir, self.output_dir, self.temp_dir):
            os.makedirs(folder, exist_ok=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await self._stop_executor()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stop_http(abort=True)
        if self._tempdir is not None:
            self._tempdir.cleanup()

    async def wait_ready(self) -> None:
        await self.ready.wait()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        # Owned tasks, cancelled and awaited by close(). Not a TaskGroup: the server's lifetime spans
        # __aenter__/__aexit__, which test fixtures may run in different tasks.
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
        app = self._make_app()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handle_signals=False)
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
        for sock in list(self.state.sockets.values()):
            sock.abort()
        if abort and runner.server is not None:
            for connection in list(runner.server.connections):
                if connection.transport is not None:
                    connection.transport.abort()

    def _start_executor(self) -> None:
        state = self.state
        self._executor = asyncio.get_running_loop().create_task(
            self._execute_forever(state), name="emulator-executor"
        )

    async def _stop_executor(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None and executor is not asyncio.current_task():
            executor.cancel()
            with contextlib.suppress(asyncio.CancelledError, _Crash):
                await executor

    async def restart(self, down_s: float = 0.0) -> None:
        """Lose queue, history, caches and loaded models, drop every socket, like a process restart.

        The new (empty) state is in place when this returns; with ``down_s`` the port stays closed that
        long first."""
        self.stats.restarts += 1
        self.stats.started_since_restart = 0
        await self._reset_state()
        if down_s > 0 or self._runner is None:
            await self._stop_http(abort=True)
            self.crashed.clear()
            if down_s > 0:
                await asyncio.sleep(down_s)
            await self._start_http()
        logger.info("emulator_restarted down_s=%s", down_s)

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
        sockets = list(self.state.sockets.values())
        for sock in sockets:
            sock.abort()
        return len(sockets)

    async def _reset_state(self) -> None:
        old = self.state
        self.state = ComfyState()
        await self._stop_executor()
        for sock in list(old.sockets.values()):
            sock.abort()
        self._start_executor()

    # -- WebSocket sending ---------------------------------------------------------------------------
    async def send_json(self, state: ComfyState, event: str, data: dict[str, Any], sid: str | None) -> None:
        text = json.dumps({"type": event, "data": data})
        if sid is None:
            targets = list(state.sockets.values())
        else:
            target = state.sockets.get(sid)
            targets = [target] if target is not None else []
        for sock in targets:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await sock.ws.send_str(text)

    async def send_preview(
        self,
        state: ComfyState,
        image: bytes,
        image_format: str,
        prompt_id: str,
        node_id: str,
        sid: str | None,
    ) -> None:
        targets = list(state.sockets.values()) if sid is None else [s for s in [state.sockets.get(sid)] if s]
        mime = "image/png" if image_format == "PNG" else "image/jpeg"
        for sock in targets:
            if sock.metadata_previews:
                metadata = json.dumps(
                    {"node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id, "parent_node_id": None,
                     "real_node_id": node_id, "image_type": mime}
                ).encode()  # fmt: skip
                payload = struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(metadata)) + metadata + image
            else:
                payload = struct.pack(">II", PREVIEW_IMAGE, 2 if image_format == "PNG" else 1) + image
            with contextlib.suppress(ConnectionError, RuntimeError):
                await sock.ws.send_bytes(payload)

    async def send_status(self, state: ComfyState) -> None:
        await self.send_json(
            state, "status", {"status": {"exec_info": {"queue_remaining": state.queue_remaining()}}}, None
        )

    # -- the executor --------------------------------------------------------------------------------
    async def _execute_forever(self, state: ComfyState) -> None:
        while True:
            while not state.heap:
                state.work.clear()
                await state.work.wait()
            # Upstream's executor is another thread: the POST /prompt answer does not wait for the run.
            # Yielding a few times lets the handler that queued this prompt flush its response first.
            for _ in range(3):
                await asyncio.sleep(0)
            if not state.heap:
                continue
            _, _, item = heapq.heappop(state.heap)
            state.running = item
            try:
                await self._execute(state, item)
            except _Crash:
                await self.crash()
                return
            except Exception:
                # A bug of the emulator, not a node error: say so loudly; the prompt is lost like in a crash.
                logger.exception("emulator_executor_error prompt_id=%s", item.prompt_id)
            finally:
                state.running = None
                state.client_id = None
                state.last_node_id = None
            if state.pending_free:
                state.free(**{k: state.pending_free.get(k, False) for k in ("unload_models", "free_memory")})
                state.pending_free = {}

    def _execution_order(self, prompt: Mapping[str, Any], outputs: list[str]) -> list[str]:
        order: list[str] = []
        seen: set[str] = set()

        def visit(node_id: str) -> None:
            if node_id in seen:
                return
            seen.add(node_id)
            for value in prompt[node_id]["inputs"].values():
                if workflow.is_link(value):
                    visit(value[0])
            order.append(node_id)

        for output in outputs:
            visit(output)
        return order

    def _signatures(self, prompt: Mapping[str, Any], order: list[str]) -> dict[str, str]:
        signatures: dict[str, str] = {}
        for node_id in order:
            node = prompt[node_id]
            parts: dict[str, Any] = {}
            for name, value in node["inputs"].items():
                parts[name] = ["link", signatures[value[0]], value[1]] if workflow.is_link(value) else value
            if node["class_type"] == "LoadImage":
                path = self.annotated_path(str(node["inputs"].get("image", "")), "input")
                stat = os.stat(path) if path else None
                parts["__file__"] = [stat.st_size, stat.st_mtime_ns] if stat else None
            encoded = json.dumps([node["class_type"], parts], sort_keys=True, default=str)
            signatures[node_id] = hashlib.sha256(encoded.encode()).hexdigest()
        return signatures

    def _plan_fault(
        self, order: list[str], prompt: Mapping[str, Any]
    ) -> tuple[str | None, NodeFailed | None, str | None]:
        """Which node (if any) fails, with what, and which node hangs."""
        options = self.options
        if options.seed != self._rng_seed:
            self._rng = random.Random(options.seed)
            self._rng_seed = options.seed
        failing: NodeFailed | None = None
        roll = self._rng.random()
        if roll < options.oom_rate:
            failing = NodeFailed("torch.OutOfMemoryError", _OOM_MESSAGE)
        elif roll < options.oom_rate + options.failure_rate:
            failing = NodeFailed("RuntimeError", "Emulated node failure (failure_rate)")
        fail_node = None
        if failing is not None and order:
            samplers = [n for n in order if prompt[n]["class_type"] == "KSampler"]
            fail_node = samplers[0] if samplers else order[-1]
        hang_node = None
        if options.hang_s > 0 and self._rng.random() < options.hang_rate:
            candidates = [n for n in order if options.hang_node in (None, prompt[n]["class_type"])]
            hang_node = candidates[0] if candidates else None
        return fail_node, failing, hang_node

    async def _execute(self, state: ComfyState, item: _QueueItem) -> None:
        stats = self.stats
        state.client_id = item.extra_data.get("client_id")
        state.interrupted = False
        state.interrupt_event.clear()
        await self.send_status(state)
        stats.prompts_started += 1
        stats.started_since_restart += 1
        stats.executions[item.prompt_id] = stats.executions.get(item.prompt_id, 0) + 1
        run = _Run(self, state, item)
        prompt = item.prompt
        await run.add_message("execution_start", {"prompt_id": item.prompt_id}, broadcast=False)
        if self.options.crash_after is not None and stats.started_since_restart > self.options.crash_after:
            raise _Crash
        order = self._execution_order(prompt, item.outputs)
        signatures = self._signatures(prompt, order) if self.options.cache else {}
        cached = [node_id for node_id in order if signatures.get(node_id) in state.cache]
        await run.add_message(
            "execution_cached", {"nodes": cached, "prompt_id": item.prompt_id}, broadcast=False
        )
        fail_node, failure, hang_node = self._plan_fault([n for n in order if n not in cached], prompt)
        values: dict[str, tuple[Any, ...]] = {}
        ui_outputs: dict[str, dict[str, Any]] = {}
        executed: list[str] = []
        status_str = "success"
        try:
            if self.options.prompt_time_s:
                run.node_id = next((n for n in order if n not in cached), "")
                await run.interruptible_sleep(self.options.prompt_time_s)
            for node_id in order:
                class_type = prompt[node_id]["class_type"]
                if node_id in cached:
                    values[node_id], ui = state.cache[signatures[node_id]]
                    state.cache.move_to_end(signatures[node_id])
                    stats.cached_nodes += 1
                    if ui is not None:
                        ui_outputs[node_id] = ui
                        await run.send(
                            "executed",
                            {
                                "node": node_id,
                                "display_node": node_id,
                                "output": ui,
                                "prompt_id": item.prompt_id,
                            },
                        )
                    continue
                run.node_id = node_id
                run.check_interrupt()
                await run.progress_state(node_id, "running")
                await run.send(
                    "executing",
                    {"node": node_id, "display_node": node_id, "prompt_id": item.prompt_id},
                    to_client_only=True,
                )
                state.last_node_id = node_id
                stats.node_executions[class_type] = stats.node_executions.get(class_type, 0) + 1
                if node_id == hang_node:
                    if math.isinf(self.options.hang_s):
                        await asyncio.Event().wait()
                    await asyncio.sleep(
                        self.options.hang_s
                    )  # deaf to interrupts, like a node without a progress bar
                if node_id == fail_node and failure is not None:
                    raise failure
                inputs = {
                    name: values[value[0]][value[1]] if workflow.is_link(value) else value
                    for name, value in prompt[node_id]["inputs"].items()
                }
                spec = NODES_BY_NAME[class_type]
                if class_type == "KSampler" and isinstance(inputs.get("model"), Model):
                    await run.load_model(_model_folder(prompt, inputs["model"]), inputs["model"].name)
                try:
                    outputs, ui = await spec.run(run, inputs)
                except (NodeFailed, _Interrupted, _Crash, asyncio.CancelledError):
                    raise
                except Exception as exc:  # any error inside a node is that prompt's execution_error
                    module = type(exc).__module__
                    name = (
                        type(exc).__qualname__
                        if module == "builtins"
                        else f"{module}.{type(exc).__qualname__}"
                    )
                    raise NodeFailed(name, str(exc)) from exc
                values[node_id] = outputs
                executed.append(node_id)
                if self.options.cache:
                    state.cache[signatures[node_id]] = (outputs, ui)
                    while len(state.cache) > _CACHE_ENTRIES:
                        state.cache.popitem(last=False)
                if ui is not None:
                    ui_outputs[node_id] = ui
                    await run.send(
                        "executed",
                        {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": item.prompt_id},
                        to_client_only=True,
                    )
                await run.progress_state(node_id, "finished", 1, 1)
            await run.add_message("execution_success", {"prompt_id": item.prompt_id}, broadcast=False)
            stats.prompts_succeeded += 1
        except _Interrupted as interrupted:
            status_str = "error"
            stats.prompts_interrupted += 1
            node_id = interrupted.node_id or run.node_id
            await run.add_message(
                "execution_interrupted",
                {"prompt_id": item.prompt_id, "node_id": node_id,
                 "node_type": prompt[node_id]["class_type"] if node_id in prompt else None, "executed": executed},
                broadcast=True,
            )  # fmt: skip
        except NodeFailed as failed:
            status_str = "error"
            stats.prompts_failed += 1
            node_id = run.node_id
            await run.add_message(
                "execution_error",
                {
                    "prompt_id": item.prompt_id,
                    "node_id": node_id,
                    "node_type": prompt[node_id]["class_type"],
                    "executed": executed,
                    "exception_message": failed.message,
                    "exception_type": failed.exception_type,
                    "traceback": [
                        '  File "execution.py", line 496, in execute\n    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(...)\n',
                        f'  File "nodes.py", line 1, in {prompt[node_id]["class_type"]}\n    raise {failed.exception_type}\n',
                    ],
                    "current_inputs": {
                        name: [repr(value)]
                        for name, value in prompt[node_id]["inputs"].items()
                        if not workflow.is_link(value)
                    },
                    "current_outputs": list(values),
                },
                broadcast=False,
            )
        state.last_node_id = None
        if self.options.history_delay_s:
            await asyncio.sleep(self.options.history_delay_s)
        state.history[item.prompt_id] = {
            "prompt": item.wire(),
            "outputs": ui_outputs,
            "status": {
                "status_str": status_str,
                "completed": status_str == "success",
                "messages": run.messages,
            },
            "meta": {
                node_id: {
                    "node_id": node_id,
                    "display_node": node_id,
                    "parent_node": None,
                    "real_node_id": node_id,
                }
                for node_id in ui_outputs
            },
        }
        while len(state.history) > MAX_HISTORY:
            state.history.popitem(last=False)
        state.running = None
        await self.send_status(state)
        await run.send("executing", {"node": None, "prompt_id": item.prompt_id}, to_client_only=True)

    # -- files ---------------------------------------------------------------------------------------
    def folder(self, kind: str | None) -> str | None:
        return {"input": self.input_dir, "output": self.output_dir, "temp": self.temp_dir}.get(kind or "")

    def annotated_path(self, name: str, default_kind: str) -> str | None:
        """Resolve ``"sub/name.png [input]"`` to an existing file under the right folder, or None."""
        kind = default_kind
        for suffix in ("input", "output", "temp"):
            if name.endswith(f" [{suffix}]"):
                name, kind = name[: -len(suffix) - 3], suffix
        root = self.folder(kind)
        if root is None or not name:
            return None
        path = os.path.abspath(os.path.join(root, name))
        if os.path.commonpath((root, path)) != root or not os.path.isfile(path):
            return None
        return path

    # -- HTTP ----------------------------------------------------------------------------------------
    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.options.max_upload_size, middlewares=[_origin_only])
        routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
            ("GET", "/ws", self._ws),
            ("POST", "/prompt", self._post_prompt),
            ("GET", "/prompt", self._get_prompt),
            ("GET", "/queue", self._get_queue),
            ("POST", "/queue", self._post_queue),
            ("POST", "/interrupt", self._post_interrupt),
            ("POST", "/free", self._post_free),
            ("GET", "/history", self._get_history),
            ("GET", "/history/{prompt_id}", self._get_history_one),
            ("POST", "/history", self._post_history),
            ("GET", "/api/jobs", self._get_jobs),
            ("POST", "/api/jobs/cancel", self._post_jobs_cancel),
            ("GET", "/api/jobs/{job_id}", self._get_job),
            ("POST", "/api/jobs/{job_id}/cancel", self._post_job_cancel),
            ("POST", "/upload/image", self._post_upload_image),
            ("GET", "/view", self._get_view),
            ("GET", "/object_info", self._get_object_info),
            ("GET", "/object_info/{node_class}", self._get_object_info_one),
            ("GET", "/system_stats", self._get_system_stats),
            ("GET", "/features", self._get_features),
            ("GET", "/models", self._get_models),
            ("GET", "/models/{folder}", self._get_models_folder),
            ("GET", "/embeddings", self._get_empty_list),
            ("GET", "/extensions", self._get_empty_list),
        ]
        for method, path, handler in routes:
            # Upstream registers every route again under /api; the jobs routes already carry the
            # prefix, so they also answer at /api/api/jobs while bare /jobs is a 404.
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        app.router.add_get("/emulator/stats", self._admin_stats)
        app.router.add_post("/emulator/faults", self._admin_faults)
        app.router.add_post("/emulator/restart", self._admin_restart)
        app.router.add_post("/emulator/crash", self._admin_crash)
        app.router.add_post("/emulator/disconnect", self._admin_disconnect)
        return app

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        state = self.state
        sid = request.query.get("clientId") or uuid.uuid4().hex
        sock = _Socket(ws, request)
        state.sockets[sid] = sock
        try:
            await ws.send_str(
                json.dumps(
                    {
                        "type": "status",
                        "data": {
                            "status": {"exec_info": {"queue_remaining": state.queue_remaining()}},
                            "sid": sid,
                        },
                    }
                )
            )
            if state.client_id == sid and state.last_node_id is not None:
                await ws.send_str(json.dumps({"type": "executing", "data": {"node": state.last_node_id}}))
            first = True
            async for message in ws:
                if message.type == WSMsgType.TEXT and first:
                    with contextlib.suppress(ValueError, AttributeError, TypeError):
                        frame = json.loads(message.data)
                        if frame.get("type") == "feature_flags":
                            sock.metadata_previews = bool(
                                (frame.get("data") or {}).get("supports_preview_metadata")
                            )
                            await ws.send_str(json.dumps({"type": "feature_flags", "data": FEATURES}))
                first = False
        finally:
            # Upstream pops by id, so a closing old socket removes a newer one registered under the same
            # id (the orphaned-reconnect pitfall). Reproduced on purpose: clients must use fresh ids.
            state.sockets.pop(sid, None)
        return ws

    async def _json_body(self, request: web.Request) -> Any:
        return json.loads(await request.text())

    async def _post_prompt(self, request: web.Request) -> web.Response:
        state = self.state
        try:
            body = await self._json_body(request)
        except ValueError:
            return _server_error()
        if isinstance(body, list | str):
            body = {}
        if not isinstance(body, dict):
            return _server_error()
        try:
            if "number" in body:
                number: float = float(body["number"])
            else:
                number = state.number
                if body.get("front"):
                    number = -number
                state.number += 1
        except (TypeError, ValueError):
            return _server_error()
        if "prompt" not in body:
            self.stats.prompts_rejected += 1
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt = body["prompt"]
        prompt_id = body.get("prompt_id")
        if prompt_id is None:
            prompt_id = str(uuid.uuid4())
        elif not _canonical_uuid(prompt_id):
            self.stats.prompts_rejected += 1
            error = {
                "type": "invalid_prompt_id",
                "message": "prompt_id must be a valid UUID",
                "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let the server generate one",
                "extra_info": {},
            }
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        try:
            result = workflow.validate(
                prompt,
                self.catalogue.validation_info(),
                partial_execution_targets=body.get("partial_execution_targets"),
                custom_validators={"LoadImage": {"image": self._validate_load_image}},
                accept_combo=self._accept_combo,
            )
        except (MalformedPrompt, TypeError, AttributeError):
            return _server_error()
        extra_data = body.get("extra_data", {})
        if not isinstance(extra_data, dict):
            return _server_error()
        extra_data = dict(extra_data)
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if "Comfy-Usage-Source" in request.headers:
            extra_data["comfy_usage_source"] = request.headers["Comfy-Usage-Source"]
        if not result.ok:
            self.stats.prompts_rejected += 1
            return web.json_response(result.response(), status=400)
        sensitive = {key: extra_data.pop(key) for key in SENSITIVE_EXTRA_DATA_KEYS if key in extra_data}
        extra_data["create_time"] = _now_ms()
        state.put(_QueueItem(number, prompt_id, prompt, extra_data, result.good_outputs, sensitive))
        self.stats.prompts_accepted += 1
        await self.send_status(state)
        return web.json_response(
            {"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors}
        )

    def _validate_load_image(self, name: str, inputs: Mapping[str, Any]) -> bool | str:
        image = inputs.get(name)
        if not isinstance(image, str) or self.annotated_path(image, "input") is None:
            return f"Invalid image file: {image}"
        return True

    def _accept_combo(self, class_type: str, input_name: str, value: Any) -> bool:
        return (
            self.options.accept_any_model
            and input_name in workflow.MODEL_INPUTS
            and isinstance(value, str)
            and value.lower().endswith(MODEL_EXTENSIONS)
            and ".." not in value
        )

    async def _get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": self.state.queue_remaining()}})

    async def _get_queue(self, request: web.Request) -> web.Response:
        state = self.state
        running = [state.running.wire()] if state.running is not None else []
        return web.json_response(
            {"queue_running": running, "queue_pending": [item.wire() for item in state.pending()]}
        )

    async def _post_queue(self, request: web.Request) -> web.Response:
        state = self.state
        try:
            body = await self._json_body(request)
            if body.get("clear"):
                state.remove_pending(lambda item: True)
            if "delete" in body:
                doomed = set(body["delete"])
                state.remove_pending(lambda item: item.prompt_id in doomed)
        except (ValueError, AttributeError, TypeError):
            return _server_error()
        await self.send_status(state)
        return web.Response(status=200)

    async def _post_interrupt(self, request: web.Request) -> web.Response:
        state = self.state
        try:
            body = await self._json_body(request)
        except ValueError:
            body = {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        if prompt_id:
            if state.running is not None and state.running.prompt_id == prompt_id:
                state.interrupt()
            else:
                logger.info("emulator_interrupt_skipped prompt_id=%s reason=not_running", prompt_id)
        else:
            state.interrupt()
        return web.Response(status=200)

    async def _post_free(self, request: web.Request) -> web.Response:
        state = self.state
        try:
            body = await self._json_body(request)
            flags = {
                "unload_models": bool(body.get("unload_models", False)),
                "free_memory": bool(body.get("free_memory", False)),
            }
        except (ValueError, AttributeError):
            return _server_error()
        if state.running is None:
            state.free(**flags)
        else:
            state.pending_free = {
                key: state.pending_free.get(key, False) or value for key, value in flags.items()
            }
        return web.Response(status=200)

    async def _get_history(self, request: web.Request) -> web.Response:
        history = self.state.history
        try:
            max_items = int(request.query["max_items"]) if "max_items" in request.query else None
            offset = int(request.query.get("offset", -1))
        except ValueError:
            return _server_error()
        if offset < 0 and max_items is not None:
            offset = len(history) - max_items
        out: dict[str, Any] = {}
        for index, key in enumerate(history):
            if index >= offset:
                out[key] = history[key]
                if max_items is not None and len(out) >= max_items:
                    break
        return web.json_response(out)

    async def _get_history_one(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self.state.history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def _post_history(self, request: web.Request) -> web.Response:
        history = self.state.history
        try:
            body = await self._json_body(request)
            if body.get("clear"):
                history.clear()
            for prompt_id in body.get("delete", []):
                history.pop(prompt_id, None)
        except (ValueError, AttributeError, TypeError):
            return _server_error()
        return web.Response(status=200)

    # jobs API
    def _job(self, prompt_id: str, *, full: bool) -> dict[str, Any] | None:
        state = self.state
        if state.running is not None and state.running.prompt_id == prompt_id:
            item = state.running
            return {"id": prompt_id, "status": "in_progress", "priority": item.number,
                    "create_time": item.extra_data.get("create_time"), "outputs_count": 0}  # fmt: skip
        entry = state.history.get(prompt_id)
        if entry is None:
            for item in state.pending():
                if item.prompt_id == prompt_id:
                    return {"id": prompt_id, "status": "pending", "priority": item.number,
                            "create_time": item.extra_data.get("create_time"), "outputs_count": 0}  # fmt: skip
            return None
        return _job_from_history(prompt_id, entry, full=full)

    async def _get_job(self, request: web.Request) -> web.Response:
        job = self._job(request.match_info["job_id"], full=True)
        if job is None:
            return web.json_response({"error": "Job not found"}, status=404)
        return web.json_response(job)

    async def _get_jobs(self, request: web.Request) -> web.Response:
        query = request.query
        statuses = [s.strip() for s in query.get("status", "").split(",") if s.strip()] or list(JOB_STATUSES)
        bad = [s for s in statuses if s not in JOB_STATUSES]
        if bad:
            return web.json_response(
                {
                    "error": f"Invalid status value(s): {', '.join(bad)}. Valid values: {', '.join(JOB_STATUSES)}"
                },
                status=400,
            )
        sort_by, sort_order = query.get("sort_by", "created_at"), query.get("sort_order", "desc")
        if sort_by not in ("created_at", "execution_duration"):
            return web.json_response(
                {"error": "sort_by must be 'created_at' or 'execution_duration'"}, status=400
            )
        if sort_order not in ("asc", "desc"):
            return web.json_response({"error": "sort_order must be 'asc' or 'desc'"}, status=400)
        try:
            limit = int(query["limit"]) if query.get("limit") else None
            offset = int(query.get("offset") or 0)
        except ValueError:
            return web.json_response({"error": "limit and offset must be integers"}, status=400)
        if (limit is not None and limit < 1) or offset < 0:
            return web.json_response(
                {"error": "limit must be positive and offset must be non-negative"}, status=400
            )
        state = self.state
        ids = (
            ([state.running.prompt_id] if state.running else [])
            + [i.prompt_id for i in state.pending()]
            + list(state.history)
        )
        jobs = [
            job
            for job in (self._job(i, full=False) for i in dict.fromkeys(ids))
            if job and job["status"] in statuses
        ]
        workflow_id = query.get("workflow_id")
        if workflow_id:
            jobs = [job for job in jobs if job.get("workflow_id") == workflow_id]

        def key(job: dict[str, Any]) -> float:
            if sort_by == "execution_duration":
                start, end = job.get("execution_start_time"), job.get("execution_end_time")
                return float(end - start) if start is not None and end is not None else -1.0
            return float(job.get("create_time") or 0)

        jobs.sort(key=key, reverse=sort_order == "desc")
        total = len(jobs)
        page = jobs[offset : offset + limit if limit is not None else None]
        return web.json_response(
            {
                "jobs": page,
                "pagination": {
                    "offset": offset,
                    "limit": limit,
                    "total": total,
                    "has_more": offset + len(page) < total,
                },
            }
        )

    def _cancel(self, prompt_id: str) -> bool:
        state = self.state
        if state.running is not None and state.running.prompt_id == prompt_id:
            state.interrupt()
            return True
        return state.remove_pending(lambda item: item.prompt_id == prompt_id) > 0

    async def _post_job_cancel(self, request: web.Request) -> web.Response:
        cancelled = self._cancel(request.match_info["job_id"])
        if cancelled:
            await self.send_status(self.state)
        return web.json_response({"cancelled": cancelled})

    async def _post_jobs_cancel(self, request: web.Request) -> web.Response:
        try:
            body = await self._json_body(request)
        except ValueError:
            return web.json_response({"error": "Invalid JSON body"}, status=400)
        job_ids = body.get("job_ids") if isinstance(body, dict) else None
        if not isinstance(job_ids, list):
            return web.json_response({"error": "job_ids must be a list"}, status=400)
        invalid = [job_id for job_id in job_ids if not _canonical_uuid(job_id)]
        if invalid:
            return web.json_response(
                {"error": "job_ids contains invalid id(s)", "invalid_ids": invalid}, status=400
            )
        cancelled = [self._cancel(job_id) for job_id in job_ids]
        if any(cancelled):
            await self.send_status(self.state)
        return web.json_response({"cancelled": any(cancelled)})

    # files
    async def _post_upload_image(self, request: web.Request) -> web.Response:
        try:
            post = await request.post()
        except ValueError:
            return web.Response(status=400)
        image = post.get("image")
        if not isinstance(image, web.FileField) or not image.filename:
            return web.Response(status=400)
        kind = str(post.get("type") or "input")
        root = self.folder(kind)
        if root is None:
            kind, root = "input", self.input_dir
        subfolder = str(post.get("subfolder", ""))
        overwrite = str(post.get("overwrite")) in ("true", "1")
        stored = await asyncio.to_thread(
            _store_upload, root, subfolder, image.filename, image.file.read(), overwrite
        )
        if stored is None:
            return web.Response(status=400)
        return web.json_response({"name": stored, "subfolder": subfolder, "type": kind})

    async def _get_view(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        if "filename" not in query:
            return web.Response(status=404)
        filename = query["filename"]
        kind = query.get("type", "output")
        for suffix in ("input", "output", "temp"):
            if filename.endswith(f" [{suffix}]"):
                filename, kind = filename[: -len(suffix) - 3], suffix
        if not filename or filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        root = self.folder(kind)
        if root is None:
            return web.Response(status=400)
        status, path = _view_path(root, query.get("subfolder"), filename)
        if path is None:
            return web.Response(status=status)
        filename = os.path.basename(filename)
        headers = {"Content-Disposition": f'filename="{filename}"', "X-Content-Type-Options": "nosniff"}
        preview = query.get("preview")
        channel = query.get("channel", "rgba")
        if preview or channel in ("rgb", "a"):
            body, content_type = await asyncio.to_thread(_transcode, path, preview, channel)
            return web.Response(body=body, content_type=content_type, headers=headers)
        return web.FileResponse(path, headers=headers)

    async def _get_object_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.catalogue.object_info())

    async def _get_object_info_one(self, request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        spec = NODES_BY_NAME.get(name)
        return web.json_response({name: self.catalogue.node_info(spec)} if spec else {})

    async def _get_system_stats(self, request: web.Request) -> web.Response:
        import psutil

        memory = psutil.virtual_memory()
        vram = 24 * 1024**3
        return web.json_response(
            {
                "system": {
                    "os": os.name,
                    "ram_total": memory.total,
                    "ram_free": memory.available,
                    "comfyui_version": COMFYUI_VERSION,
                    "required_frontend_version": "1.28.7",
                    "installed_templates_version": "0.1.95",
                    "required_templates_version": "0.1.95",
                    "python_version": sys.version,
                    "pytorch_version": "emulated",
                    "embedded_python": False,
                    "argv": ["main.py", "--emulated", "--port", str(self.port)],
                },
                "devices": [
                    {
                        "name": f"cuda:0 Emulated GPU ({platform.machine()})",
                        "type": "cuda",
                        "index": 0,
                        "vram_total": vram,
                        "vram_free": vram - len(self.state.loaded_models) * 4 * 1024**3,
                        "torch_vram_total": vram,
                        "torch_vram_free": vram,
                    }
                ],
            }
        )

    async def _get_features(self, request: web.Request) -> web.Response:
        return web.json_response({**FEATURES, "max_upload_size": self.options.max_upload_size})

    async def _get_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            sorted(
                set(self.options.models)
                | {"checkpoints", "loras", "vae", "text_encoders", "diffusion_models"}
            )
        )

    async def _get_models_folder(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in self.options.models and folder not in (
            "checkpoints",
            "loras",
            "vae",
            "text_encoders",
            "diffusion_models",
        ):
            return web.Response(status=404)
        return web.json_response(self.catalogue.model_files(folder))

    async def _get_empty_list(self, request: web.Request) -> web.Response:
        return web.json_response([])

    # admin (comfyfleet only)
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

    async def _admin_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats_snapshot())

    async def _admin_faults(self, request: web.Request) -> web.Response:
        try:
            changes = await self._json_body(request)
            if not isinstance(changes, dict):
                raise OptionsError("the body must be a JSON object of option names to values")
            self.options.update(changes)
        except ValueError as exc:  # OptionsError and bad JSON alike
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.options.public())

    async def _admin_restart(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.text() or "{}")
            down_s = float(body.get("down_s", 0.0))
        except (ValueError, AttributeError, TypeError):
            return web.json_response({"error": 'body must be {"down_s": seconds}'}, status=400)
        self.stats.restarts += 1
        self.stats.started_since_restart = 0
        await self._reset_state()  # before answering: any later request sees the empty server
        if down_s > 0:
            self._spawn(self._down_for(down_s), "emulator-restart")
        return web.json_response({"restarted": True, "down_s": down_s})

    async def _down_for(self, seconds: float) -> None:
        await self._stop_http(abort=True)
        await asyncio.sleep(seconds)
        await self._start_http()

    async def _admin_crash(self, request: web.Request) -> web.Response:
        self._spawn(self.crash(), "emulator-crash")
        return web.json_response({"crashing": True})

    async def _admin_disconnect(self, request: web.Request) -> web.Response:
        return web.json_response({"disconnected": await self.disconnect_sockets()})


def _model_folder(prompt: Mapping[str, Any], model: Model) -> str:
    for reference in workflow.model_references(prompt):
        if reference.name == model.name:
            return reference.folder
    return "checkpoints"


def _job_from_history(prompt_id: str, entry: dict[str, Any], *, full: bool) -> dict[str, Any]:
    messages = entry["status"]["messages"]
    last = messages[-1][0] if messages else None
    if entry["status"]["status_str"] == "success":
        status = "completed"
    elif last == "execution_interrupted":
        status = "cancelled"
    else:
        status = "failed"
    number, _, prompt, extra_data, _ = entry["prompt"]
    files = [
        {**file, "nodeId": node_id, "mediaType": media}
        for node_id, ui in entry["outputs"].items()
        for media, items in ui.items()
        if isinstance(items, list)
        for file in items
        if isinstance(file, dict) and "filename" in file
    ]
    previewable = [file for file in files if file["mediaType"] in ("images", "video", "audio", "gifs", "3d")]
    start = next((m[1]["timestamp"] for m in messages if m[0] == "execution_start"), None)
    job: dict[str, Any] = {
        "id": prompt_id,
        "status": status,
        "priority": number,
        "create_time": extra_data.get("create_time"),
        "execution_start_time": start,
        "execution_end_time": messages[-1][1].get("timestamp") if messages else None,
        "outputs_count": len(files),
        "previewable_outputs_count": len(previewable),
        "preview_output": previewable[0] if previewable else None,
    }
    workflow_info = (extra_data.get("extra_pnginfo") or {}).get("workflow")
    if isinstance(workflow_info, dict) and workflow_info.get("id"):
        job["workflow_id"] = workflow_info["id"]
    if status == "failed" and last == "execution_error":
        job["execution_error"] = messages[-1][1]
    if full:
        job["outputs"] = entry["outputs"]
        job["execution_status"] = entry["status"]
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def _store_upload(root: str, subfolder: str, filename: str, data: bytes, overwrite: bool) -> str | None:
    """Upstream's ``image_upload``: the stored name, or None for a subfolder escape. Identical bytes under
    the same name are not copied again; different bytes get ``"name (1).png"`` unless ``overwrite``."""
    folder = os.path.join(root, os.path.normpath(subfolder)) if subfolder else root
    path = os.path.abspath(os.path.join(folder, filename))
    if os.path.commonpath((root, path)) != root:
        return None
    os.makedirs(folder, exist_ok=True)
    if not overwrite:
        stem, ext = os.path.splitext(filename)
        counter = 1
        while os.path.exists(path):
            with open(path, "rb") as existing:
                if existing.read() == data:
                    return filename
            filename = f"{stem} ({counter}){ext}"
            path = os.path.join(folder, filename)
            counter += 1
    with open(path, "wb") as file:
        file.write(data)
    return filename


def _view_path(root: str, subfolder: str | None, filename: str) -> tuple[int, str | None]:
    if subfolder is not None:
        full = os.path.join(root, subfolder)
        if os.path.commonpath((os.path.abspath(full), root)) != root:
            return 403, None
        root = full
    path = os.path.join(root, os.path.basename(filename))
    return (200, path) if os.path.isfile(path) else (404, None)


def _transcode(path: str, preview: str | None, channel: str) -> tuple[bytes, str]:
    with Image.open(path) as opened:
        image = opened.convert("RGBA")
    if channel == "rgb":
        image = image.convert("RGB")
    elif channel == "a":
        alpha = image.getchannel("A")
        image = Image.merge("RGBA", (alpha, alpha, alpha, alpha))
    buffer = io.BytesIO()
    if preview:
        image_format, _, quality = preview.partition(";")
        image_format = "webp" if image_format not in ("webp", "jpeg") else image_format
        image.convert("RGB").save(
            buffer, format=image_format.upper(), quality=int(quality) if quality.isdigit() else 90
        )
        return buffer.getvalue(), f"image/{image_format}"
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


def _canonical_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


@web.middleware
async def _origin_only(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Upstream's only guard: cross-site requests to a loopback server get 403."""
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        return web.Response(status=403)
    if "Host" in request.headers and "Origin" in request.headers:
        host_domain = request.headers["Host"].lower()
        origin_domain = urllib.parse.urlparse(request.headers["Origin"]).netloc.lower()
        if _is_loopback(urllib.parse.urlsplit("//" + host_domain).hostname) and host_domain != origin_domain:
            return web.Response(status=403)
    return await handler(request)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


# Re-exported for typing of node values in tests.
__all__ = ["ComfyState", "EmulatorServer", "EmulatorStats", "Latent"]
