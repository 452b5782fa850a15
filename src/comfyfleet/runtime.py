"""The composition root: builds every component from the settings, runs them, shuts them down.

Only this module picks concrete backends (store by URL, providers, output storage), and only it assembles
the HTTP application: :func:`create_app` builds the :class:`~comfyfleet.http.Services` and mounts the REST
API, Comfy API v2, the ComfyUI gateway, ``/metrics`` and the dashboard on one :class:`~comfyfleet.http.ServiceApp`. Long-lived
components are async context managers entered in one ``AsyncExitStack`` (closed in reverse order:
HTTP stops before the dispatcher, the dispatcher before the store), and their loops run as named tasks
of one ``TaskGroup`` next to the HTTP server. If a loop dies, the whole service stops loudly instead of
limping on.

``serve(settings)`` is what ``comfyfleet serve`` calls; it is the one place that installs signal handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Self

import uvicorn

from comfyfleet import api
from comfyfleet.apiv2 import install_apiv2
from comfyfleet.assets import ModelLibrary
from comfyfleet.config import Settings
from comfyfleet.dashboard import install_dashboard
from comfyfleet.dispatch.dispatcher import Dispatcher
from comfyfleet.events import EventBus
from comfyfleet.fleet.errors import FleetError
from comfyfleet.fleet.manager import FleetManager
from comfyfleet.gateway import install_gateway
from comfyfleet.http import FleetControl, PreviewSource, ServiceApp, Services
from comfyfleet.http.head_joining import joining_heads
from comfyfleet.metrics.routes import router as metrics_router
from comfyfleet.models.service import ModelService
from comfyfleet.outputs import OutputsError, OutputStore, open_outputs
from comfyfleet.store import Store, StoreError, open_store
from comfyfleet.webhooks import WebhookDeliverer

logger = logging.getLogger("comfyfleet.runtime")

# Seconds that open HTTP requests get to finish after a stop was asked for.
GRACEFUL_SHUTDOWN_S = 10

ServiceLoop = Callable[[], Awaitable[None]]


class RuntimeFailure(Exception):
    """Root of the runtime's errors: start-up failed, or a component's loop stopped on its own."""


class StartupError(RuntimeFailure):
    """The service could not start (store unreachable, address in use…); the message says why."""


class ServiceDied(RuntimeFailure):
    """A background loop raised or returned while the service was meant to be running."""


def create_app(
    settings: Settings,
    store: Store,
    *,
    bus: EventBus | None = None,
    outputs: OutputStore | None = None,
    fleet: FleetControl | None = None,
    dispatcher: PreviewSource | None = None,
    models: ModelService | None = None,
) -> ServiceApp:
    """The HTTP application over an open ``store`` (tests build it the same way, with fewer services)."""
    return compose_app(
        Services.build(
            settings, store, bus=bus, outputs=outputs, fleet=fleet, previews=dispatcher, models=models
        )
    )


def compose_app(services: Services) -> ServiceApp:
    """Mount every part of the HTTP edge: the REST API first (routes are matched in order, and submissions
    are the hot path), then Comfy API v2 under ``/api/v2``, ``/metrics``, the ComfyUI gateway (at the root and under ``/api``) and the
    dashboard at ``/``."""
    app = ServiceApp(services, title="comfyfleet", description=api.DESCRIPTION, openapi_tags=api.OPENAPI_TAGS)
    api.install_api(app)
    install_apiv2(app)
    app.include_router(metrics_router)
    install_gateway(app, services)
    install_dashboard(app)
    return app


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume others can reach it


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: stops come from :meth:`Runtime.request_stop`, and
    uvicorn's habit of re-raising the signal after shutdown would kill the process before the
    runtime closed the store."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Runtime:
    """Everything comfyfleet runs in one process: store, HTTP API and (later) dispatcher and fleet.

    ``async with Runtime(settings) as runtime: await runtime.run()``. Entering opens and migrates the
    store and builds the app; :meth:`run` serves until :meth:`request_stop` (or a loop dies).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stack = AsyncExitStack()
        self._loops: list[tuple[str, ServiceLoop]] = []
        self._server: _Server | None = None
        self._stop_requested = False
        self._store: Store | None = None
        self._app: ServiceApp | None = None
        self._socket: socket.socket | None = None
        self._listening = asyncio.Event()

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeFailure("the runtime is not started: use 'async with Runtime(settings)'")
        return self._store

    @property
    def app(self) -> ServiceApp:
        if self._app is None:
            raise RuntimeFailure("the runtime is not started: use 'async with Runtime(settings)'")
        return self._app

    @property
    def services(self) -> Services:
        """What the HTTP application serves with (the app's current services)."""
        return self.app.services

    @property
    def bound_port(self) -> int | None:
        """The port actually listened on (useful with port 0), once :meth:`run` bound it."""
        return self._socket.getsockname()[1] if self._socket is not None else None

    async def wait_listening(self) -> int:
        """Wait until :meth:`run` listens (connections are accepted from then on); return the port."""
        await self._listening.wait()
        port = self.bound_port
        if port is None:
            raise RuntimeFailure("the runtime stopped listening")
        return port

    def add_loop(self, name: str, loop: ServiceLoop) -> None:
        """Run ``loop()`` next to the HTTP server for the life of the service (call before :meth:`run`).
        It is cancelled at shutdown; if it raises or returns earlier, the service stops."""
        self._loops.append((name, loop))

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        settings = self.settings
        try:
            store = await self._stack.enter_async_context(open_store(settings.store))
            applied = await store.migrate()
        except StoreError as exc:
            raise StartupError(f"cannot open the store {_redact(settings.store)}: {exc}") from exc
        logger.info("store_opened store=%s migrations_applied=%s", _redact(settings.store), len(applied))
        self._store = store

        replica_id = _replica_id(settings)
        bus = EventBus(store, replica_id=replica_id, shared=not settings.store.startswith("sqlite:"))
        try:
            outputs = open_outputs(settings.outputs)
            library = ModelLibrary(store, outputs)
            models = await self._stack.enter_async_context(
                ModelService(settings.models, assets=library.read_sha256)
            )
            fleet = await self._stack.enter_async_context(
                FleetManager(settings, store, replica_id=replica_id, models=models)
            )
        except (OutputsError, FleetError) as exc:
            # A bad pool or outputs setting is a configuration problem: say which, without a traceback.
            raise StartupError(str(exc)) from exc
        # Entered after the fleet, so it is closed first: no prompt is submitted to a worker being stopped.
        dispatcher = await self._stack.enter_async_context(
            Dispatcher(
                store,
                fleet,
                outputs,
                settings.dispatch,
                owner=replica_id,
                bus=bus,
                pools=list(fleet.pools.values()),
                limits_max_input_bytes=settings.limits.max_input_bytes,
                models=models,
            )
        )
        # Webhooks of ended tasks, from the store's outbox (every replica delivers; leases keep them apart).
        webhooks = await self._stack.enter_async_context(
            WebhookDeliverer(store, settings, owner=replica_id, bus=bus)
        )
        self.add_loop("fleet", fleet.run)
        self.add_loop("dispatcher", dispatcher.run)
        self.add_loop("webhooks", webhooks.run)
        if not fleet.pools:
            logger.warning(
                "running_without_workers: no workers are configured (--worker URL or pools in the config); "
                "submitted tasks wait in the queue until workers exist"
            )

        self._app = create_app(
            settings, store, bus=bus, outputs=outputs, fleet=fleet, dispatcher=dispatcher, models=models
        )

    def request_stop(self) -> None:
        """Begin a graceful stop (the first call) or stop at once (the second)."""
        server = self._server
        if self._stop_requested and server is not None:
            logger.warning("shutdown_forced")
            server.force_exit = True
        self._stop_requested = True
        if server is not None:
            server.should_exit = True

    async def run(self) -> None:
        """Serve HTTP and run the loops until :meth:`request_stop`; raise :class:`ServiceDied` if a loop dies."""
        settings = self.settings
        self._socket = sock = _listen(settings.host, settings.port)
        config = uvicorn.Config(
            self.app,
            lifespan="off",  # the runtime owns start-up and shutdown
            log_config=None,  # logging is configured by the CLI only
            access_log=False,
            server_header=False,
            http=_fastest_http(),
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        server = self._server = _Server(config)
        if self._stop_requested:
            server.should_exit = True
        host, port = sock.getsockname()[:2]
        self._warn_if_open(settings, port)
        logger.info("api_listening url=http://%s:%s", f"[{host}]" if ":" in host else host, port)
        self._listening.set()

        failures: list[BaseException] = []

        async def guarded(name: str, loop: ServiceLoop) -> None:
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.exception("service_died name=%s", name)
                failures.append(exc)
            else:
                if not server.should_exit:
                    logger.error("service_died name=%s reason=returned", name)
                    failures.append(ServiceDied(f"{name} stopped on its own"))
            server.should_exit = True

        try:
            async with asyncio.TaskGroup() as group:
                loops = [group.create_task(guarded(name, loop), name=name) for name, loop in self._loops]
                try:
                    await server.serve(sockets=[sock])
                finally:
                    for task in loops:
                        task.cancel()
        finally:
            sock.close()
            self._socket = None
            self._listening.clear()
        logger.info("api_stopped")
        if failures:
            raise ServiceDied(f"a background loop died: {failures[0]!r}") from failures[0]

    def _warn_if_open(self, settings: Settings, port: int) -> None:
        if not settings.api_keys and not is_loopback(settings.host):
            logger.warning(
                "api_unprotected host=%s: NO API KEYS ARE CONFIGURED AND THE API LISTENS ON A NON-LOOPBACK "
                "ADDRESS: anyone who can reach %s:%s can submit, read and cancel tasks. Add api_keys to the "
                "config (see 'comfyfleet hash-key').",
                settings.host,
                settings.host,
                port,
            )


def _fastest_http() -> type[asyncio.Protocol]:
    """uvicorn's quickest HTTP protocol (httptools' parser when installed), writing through a
    :class:`~comfyfleet.http.head_joining.HeadJoiningTransport`."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as protocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as protocol  # type: ignore[assignment]
    return joining_heads(protocol)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket for ``host:port``; a clear :class:`StartupError` if the address is unusable."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def _replica_id(settings: Settings) -> str:
    """Who owns this process's leases. SQLite serves one replica, so a stable id lets a restarted
    process take its own running attempts back at once instead of waiting for their leases to expire."""
    if settings.replica_id:
        return settings.replica_id
    if settings.store.startswith("sqlite:"):
        return "local"
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def _redact(url: str) -> str:
    """The store URL without its password, for logs and messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{location}"


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _spare_start_up_objects_from_gc() -> None:
    """Move what start-up built (modules, the application, its schemas: ~100,000 objects) out of the cyclic
    garbage collector's reach. They live as long as the process, yet every full collection walked them
    all again: under a stream of submissions that was ~8 % of the server's CPU. Objects made later are
    collected as usual. Only the process entry point does this (tests start many runtimes in one process)."""
    gc.collect()
    gc.freeze()


def serve(settings: Settings) -> None:
    """Run the service until SIGINT/SIGTERM (a second one forces the stop). Called by ``comfyfleet serve``.

    Raises :class:`StartupError` when the service cannot start.
    """

    async def main() -> None:
        async with Runtime(settings) as runtime:
            _spare_start_up_objects_from_gc()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, runtime.request_stop)
            try:
                await runtime.run()
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)

    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        runner.run(main())
