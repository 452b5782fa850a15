"""A stand-in for Novita AI's GPU-instance API, written from the reference, for tests, demos and benchmarks.

It serves the documented paths under ``/gpu-instance/openapi/v1`` with bare JSON answers, Bearer auth (401
otherwise), paging with ``pageSize``/``pageNum``, and Novita's observed error body ``{"code", "reason",
"message", "metadata"}`` (``reason: RESOURCE_NOT_FOUND`` for an unknown instance). Instances move
``toCreate → creating → pulling → running`` over configurable times; once ``running``, each one runs a real
ComfyUI emulator on loopback and ``portMappings[].endpoint`` of get-instance points at it (list items carry no
endpoint, as documented). Delete moves ``toRemove → removing → removed``, then the instance is not found.

Scripted faults: the next N creates fail while pulling (``statusError`` set, status ``exited``), the next N
requests answer 429 (with ``Retry-After``) or 503. Set them in :class:`NovitaEmulatorOptions` or at run time
with ``POST /emulator/script``; ``GET /emulator/state`` shows every instance (removed ones too) and request
counters. Paging: ``pageNum`` counts from 1 and 0 is read as 1 (the docs do not say which; clients must cope).

Run it with ``comfyfleet novita-emulator --port 8910``, or in-process::

    async with NovitaEmulator(NovitaEmulatorOptions(pulling_s=0.5)) as novita:
        novita.api_base  # e.g. http://127.0.0.1:41234/gpu-instance/openapi/v1
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web

from comfyfleet.emulators.comfyui import EmulatorOptions, EmulatorServer
from comfyfleet.emulators.novita.instances import PRODUCTS, ApiError, Instance, describe, new_instance

logger = logging.getLogger(__name__)

API_PREFIX = "/gpu-instance/openapi/v1"


@dataclasses.dataclass
class NovitaEmulatorOptions:
    api_key: str = "novita-emulator-key"
    to_create_s: float = 0.1
    creating_s: float = 0.1
    pulling_s: float = 0.3
    stopping_s: float = 0.1
    starting_s: float = 0.1
    removing_s: float = 0.1
    comfy: EmulatorOptions = dataclasses.field(default_factory=EmulatorOptions)  # each instance's ComfyUI
    comfy_host: str = "127.0.0.1"
    fail_starts: int = 0  # the next N created instances fail while pulling (statusError, then exited)
    fail_message: str = "pull image failed: manifest unknown"
    rate_limit_next: int = 0  # the next N API requests answer 429
    server_error_next: int = 0  # the next N API requests answer 503
    retry_after_s: float | None = 0.0  # Retry-After on those answers (None: no header)
    max_page_size: int = 1000


class NovitaEmulator:
    """The emulator as an async context manager: a real HTTP server on ``host:port`` (0 picks one)."""

    def __init__(
        self, options: NovitaEmulatorOptions | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.options = options or NovitaEmulatorOptions()
        self.host = host
        self.port = port
        self.instances: dict[str, Instance] = {}
        self.requests: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        return self.url + API_PREFIX

    async def __aenter__(self) -> NovitaEmulator:
        app = web.Application(middlewares=[self._middleware])
        api = [
            web.post(f"{API_PREFIX}/gpu/instance/create", self._create),
            web.get(f"{API_PREFIX}/gpu/instances", self._list),
            web.get(f"{API_PREFIX}/gpu/instance", self._get),
            web.post(f"{API_PREFIX}/gpu/instance/start", self._start),
            web.post(f"{API_PREFIX}/gpu/instance/stop", self._stop),
            web.post(f"{API_PREFIX}/gpu/instance/restart", self._restart),
            web.post(f"{API_PREFIX}/gpu/instance/delete", self._delete),
            web.get(f"{API_PREFIX}/products", self._products),
            web.get("/emulator/state", self._admin_state),
            web.post("/emulator/script", self._admin_script),
        ]
        app.add_routes(api)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        self._runner = runner
        logger.info("novita_emulator_listening url=%s", self.url)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for instance in self.instances.values():
            if instance.comfy is not None:
                await instance.comfy.close()
                instance.comfy = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        # Owned: cancelled and awaited when the emulator closes.
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("novita_emulator_task_failed task=%s", task.get_name(), exc_info=task.exception())

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not request.path.startswith(API_PREFIX):
            return await handler(request)
        self.requests[f"{request.method} {request.path.removeprefix(API_PREFIX)}"] += 1
        try:
            if request.headers.get("Authorization") != f"Bearer {self.options.api_key}":
                raise ApiError(401, "UNAUTHORIZED", "invalid or missing API key")
            retry_headers = {}
            if self.options.retry_after_s is not None:
                retry_headers["Retry-After"] = f"{self.options.retry_after_s:g}"
            if self.options.rate_limit_next > 0:
                self.options.rate_limit_next -= 1
                raise ApiError(429, "TOO_MANY_REQUESTS", "rate limit exceeded", retry_headers)
            if self.options.server_error_next > 0:
                self.options.server_error_next -= 1
                raise ApiError(503, "SERVICE_UNAVAILABLE", "service overloaded, retry later", retry_headers)
            return await handler(request)
        except ApiError as exc:
            return web.json_response(
                {"code": exc.status, "reason": exc.reason, "message": exc.message, "metadata": {}},
                status=exc.status,
                headers=exc.headers,
            )

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "INVALID_PARAMETER", "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "INVALID_PARAMETER", "request body must be a JSON object")
        return body

    def _find(self, instance_id: Any) -> Instance:
        if not isinstance(instance_id, str) or not instance_id:
            raise ApiError(400, "INVALID_PARAMETER", "instanceId is required")
        instance = self.instances.get(instance_id)
        if instance is None or instance.status == "removed":
            raise ApiError(400, "RESOURCE_NOT_FOUND", f"instance {instance_id} not found")
        return instance

    def _drive(self, instance: Instance, coro: Coroutine[Any, Any, None]) -> None:
        if instance.driver is not None and not instance.driver.done():
            instance.driver.cancel()
        instance.driver = self._spawn(coro, f"novita-{instance.id}")

    # -- instance lifecycle -----------------------------------------------------------------------------------

    async def _boot(self, instance: Instance) -> None:
        if instance.will_fail:
            await asyncio.sleep(self.options.pulling_s)
            instance.status_error = {"state": "pullImageFailed", "message": self.options.fail_message}
            instance.set_status("exited")
            return
        await asyncio.sleep(self.options.pulling_s)
        comfy = EmulatorServer(dataclasses.replace(self.options.comfy), host=self.options.comfy_host, port=0)
        instance.comfy = comfy  # before start: a delete that cancels this boot must find it to close it
        try:
            await comfy.start()
        except BaseException:
            instance.comfy = None
            await asyncio.shield(comfy.close())
            raise
        instance.set_status("running")

    async def _run_create(self, instance: Instance) -> None:
        await asyncio.sleep(self.options.to_create_s)
        instance.set_status("creating")
        await asyncio.sleep(self.options.creating_s)
        instance.set_status("pulling")
        await self._boot(instance)

    async def _halt_comfy(self, instance: Instance) -> None:
        if instance.comfy is not None:
            comfy, instance.comfy = instance.comfy, None
            await comfy.close()

    async def _run_stop(self, instance: Instance) -> None:
        await asyncio.sleep(self.options.stopping_s)
        instance.set_status("stopping")
        await self._halt_comfy(instance)
        await asyncio.sleep(self.options.stopping_s)
        instance.set_status("exited")

    async def _run_start(self, instance: Instance, first: str) -> None:
        await self._halt_comfy(instance)
        await asyncio.sleep(self.options.starting_s)
        instance.set_status("starting" if first == "toStart" else "restarting")
        await asyncio.sleep(self.options.starting_s)
        instance.status_error = {"state": "", "message": ""}
        await self._boot(instance)

    async def _run_delete(self, instance: Instance) -> None:
        await asyncio.sleep(self.options.removing_s)
        instance.set_status("removing")
        await self._halt_comfy(instance)
        await asyncio.sleep(self.options.removing_s)
        instance.set_status("removed")

    # -- API handlers -----------------------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        instance = new_instance(await self._json(request))
        if self.options.fail_starts > 0:
            self.options.fail_starts -= 1
            instance.will_fail = True
        self.instances[instance.id] = instance
        self._drive(instance, self._run_create(instance))
        return web.json_response({"id": instance.id})

    @staticmethod
    def _int_param(request: web.Request, name: str) -> int:
        raw = request.query.get(name)
        if raw is None or not raw.isdigit():
            raise ApiError(400, "INVALID_PARAMETER", f"{name} is required and must be an integer >= 0")
        return int(raw)

    async def _list(self, request: web.Request) -> web.Response:
        page_size = self._int_param(request, "pageSize")
        page_num = max(self._int_param(request, "pageNum"), 1)
        if page_size == 0 or page_size > self.options.max_page_size:
            raise ApiError(
                400, "INVALID_PARAMETER", f"pageSize must be from 1 to {self.options.max_page_size}"
            )
        name = request.query.get("name", "")
        product_name = request.query.get("productName", "")
        status = request.query.get("status", "")
        matches = [
            instance
            for instance in self.instances.values()
            if instance.status != "removed"
            and name in instance.name
            and product_name.lower() in instance.product["name"].lower()
            and (not status or instance.status == status)
        ]
        page = matches[(page_num - 1) * page_size : page_num * page_size]
        return web.json_response(
            {
                "instances": [describe(instance, listing=True) for instance in page],
                "total": len(matches),
            }
        )

    async def _get(self, request: web.Request) -> web.Response:
        instance = self._find(request.query.get("instanceId"))
        return web.json_response(describe(instance, listing=False))

    async def _start(self, request: web.Request) -> web.Response:
        instance = self._find((await self._json(request)).get("instanceId"))
        if instance.status != "exited":
            raise ApiError(400, "INVALID_STATE", f"instance {instance.id} is {instance.status}, not exited")
        instance.set_status("toStart")
        self._drive(instance, self._run_start(instance, "toStart"))
        return web.json_response({})

    async def _restart(self, request: web.Request) -> web.Response:
        instance = self._find((await self._json(request)).get("instanceId"))
        instance.set_status("toRestart")
        self._drive(instance, self._run_start(instance, "toRestart"))
        return web.json_response({})

    async def _stop(self, request: web.Request) -> web.Response:
        instance = self._find((await self._json(request)).get("instanceId"))
        if instance.status in ("exited", "toRemove", "removing"):
            return web.json_response({})
        instance.set_status("toStop")
        self._drive(instance, self._run_stop(instance))
        return web.json_response({})

    async def _delete(self, request: web.Request) -> web.Response:
        instance = self._find((await self._json(request)).get("instanceId"))
        if instance.status in ("toRemove", "removing"):
            return web.json_response({})
        instance.set_status("toRemove")
        self._drive(instance, self._run_delete(instance))
        return web.json_response({})

    async def _products(self, request: web.Request) -> web.Response:
        return web.json_response({"data": PRODUCTS})

    # -- admin (not part of Novita's API) ---------------------------------------------------------------------

    async def _admin_state(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "instances": [
                    {**describe(instance, listing=False), "history": instance.history}
                    for instance in self.instances.values()
                ],
                "requests": dict(self.requests),
            }
        )

    async def _admin_script(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        allowed = {"fail_starts", "rate_limit_next", "server_error_next", "retry_after_s", "fail_message"}
        unknown = set(body) - allowed if isinstance(body, dict) else {"<not an object>"}
        if unknown:
            return web.json_response({"error": f"unknown fields: {sorted(unknown)}"}, status=400)
        for key, value in body.items():
            setattr(self.options, key, value)
        return web.json_response({key: getattr(self.options, key) for key in sorted(allowed)})

    def live_instances(self) -> list[Instance]:
        return [instance for instance in self.instances.values() if instance.status != "removed"]


async def serve(
    options: NovitaEmulatorOptions,
    host: str,
    port: int,
    stop: asyncio.Event,
    *,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Run until ``stop`` is set (the CLI sets it from its signal handlers)."""
    async with NovitaEmulator(options, host=host, port=port) as emulator:
        logger.info("novita_emulator_ready api_base=%s", emulator.api_base)
        if on_listening is not None:
            on_listening(emulator.api_base)
        await stop.wait()
