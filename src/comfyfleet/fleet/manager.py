"""The worker manager: one provider per pool, worker records in the store, health probes, the autoscaler's
reconciler and the reaper. :class:`FleetManager` is the facade the runtime, the API and the dispatcher use;
the work is done by three parts, each answering one question:

- :class:`~comfyfleet.fleet.registry.WorkerRegistry` -- which workers exist and which may the dispatcher use?
  It is the dispatcher's ``WorkerDirectory``, writes the records and follows the other replicas.
- :class:`~comfyfleet.fleet.prober.Prober` -- is each worker healthy (and warmed up)?
- :class:`~comfyfleet.fleet.reconciler.Reconciler` -- what should run? It holds leadership, carries out
  :func:`~comfyfleet.fleet.autoscaler.decide`, and rediscovers and reaps through
  :class:`~comfyfleet.fleet.reaper.Reaper`.

Lifecycle (see DESIGN.md "Workers and providers")::

    pending → starting → idle ⇄ busy ⇄ draining → terminating → terminated   (+ failed)

Every instance the manager starts carries this installation's identity (``store.installation_id()``, made by
the store's first migration), and providers list only instances carrying it: two installations with the same
config on one host (or one Docker engine, one Novita account) never touch each other's workers.

Use::

    async with FleetManager(settings, store) as fleet:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(fleet.run(), name="fleet")   # returns after fleet.stop(); or cancel it
            ...

The store must be open and migrated before the manager is entered. Leaving the context terminates the workers
of providers whose workers cannot outlive comfyfleet (``process``); containers and cloud instances are left
running for the next start to adopt (an idle one is stopped by the autoscaler after ``idle_timeout``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from comfyfleet.domain import Worker, WorkerMetrics, WorkerState
from comfyfleet.fleet.autoscaler import PoolSnapshot
from comfyfleet.fleet.errors import FleetClosed, FleetConfigError, WorkerStateConflict
from comfyfleet.fleet.health import HealthProber
from comfyfleet.fleet.pools import POOL_NAME, PoolTracker, new_worker_id, pools_from_settings, utcnow
from comfyfleet.fleet.prober import Prober
from comfyfleet.fleet.providers import Provider, ProviderContext, build_provider
from comfyfleet.fleet.reaper import Reaper
from comfyfleet.fleet.reconciler import LEADER_LOCK, Demand, Reconciler
from comfyfleet.fleet.registry import NOTIFY_CHANNEL, TERMINATE_REQUESTED, WorkerRegistry
from comfyfleet.fleet.signals import FleetSignals
from comfyfleet.store.base import StoreError

if TYPE_CHECKING:
    from comfyfleet.config import PoolConfig, Settings
    from comfyfleet.models.service import ModelService
    from comfyfleet.store.base import Store

logger = logging.getLogger(__name__)

ProviderFactory = Callable[["PoolConfig", ProviderContext], Provider]
INSTALLATION_ID = re.compile(r"^[a-z0-9]{8,32}$")
# Stands in for the store's identity while the pools are checked at construction (the store is read on enter).
_CHECKING_ONLY = "0" * 16

__all__ = [
    "LEADER_LOCK",
    "NOTIFY_CHANNEL",
    "POOL_NAME",
    "FleetManager",
    "ProviderFactory",
    "new_worker_id",
    "pools_from_settings",
    "utcnow",
]


class FleetManager:
    """Implements :class:`comfyfleet.fleet.base.WorkerDirectory` over every configured pool."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        provider_factory: ProviderFactory | None = None,
        prober: HealthProber | None = None,
        replica_id: str | None = None,
        models: ModelService | None = None,
    ) -> None:
        fleet = settings.fleet
        self._store = store
        self._replica_id = replica_id or settings.replica_id or uuid.uuid4().hex[:12]
        self.pools: dict[str, PoolConfig] = pools_from_settings(settings)
        self._factory = provider_factory or build_provider
        self._namespace = fleet.namespace
        self._workers_dir = Path(settings.models.workers_dir)
        self._cache_dir = Path(settings.models.cache_dir)
        self._models = models
        # Built once now, so a bad pool fails at start-up with a message naming it, not on the first scale-up;
        # the providers that run are built on enter, once the store has said which installation this is.
        self._build_providers(_CHECKING_ONLY)
        self._providers: dict[str, Provider] = {}
        default_pool = fleet.default_pool
        if default_pool is not None and default_pool not in self.pools:
            raise FleetConfigError(f"fleet.default_pool {default_pool!r} is not a configured pool")
        self._http = prober or HealthProber(timeout_s=fleet.probe_timeout_s)
        self._own_http = prober is None
        self._signals = FleetSignals()
        self._registry = WorkerRegistry(self.pools, store, self._signals, self._replica_id)
        trackers = {name: PoolTracker() for name in self.pools}
        registry, signals, pools, providers = self._registry, self._signals, self.pools, self._providers
        self._prober = Prober(
            registry=registry,
            signals=signals,
            pools=pools,
            providers=providers,
            trackers=trackers,
            fleet=fleet,
            http=self._http,
            spawn=self._spawn,
            models=models,
        )
        self._reaper = Reaper(
            registry=registry, signals=signals, store=store, pools=pools, providers=providers, fleet=fleet
        )
        self._reconciler = Reconciler(
            registry=registry,
            signals=signals,
            store=store,
            pools=pools,
            providers=providers,
            trackers=trackers,
            reaper=self._reaper,
            fleet=fleet,
            replica_id=self._replica_id,
            spawn=self._spawn,
        )
        self._stack: AsyncExitStack | None = None
        self._opened = False
        self._closed = False
        self._tg: asyncio.TaskGroup | None = None
        self.installation_id: str | None = None  # the store's, once entered

    def _build_providers(self, installation: str) -> dict[str, Provider]:
        context = ProviderContext(
            namespace=self._namespace,
            state_dir=Path("comfyfleet-workers"),
            installation=installation,
            workers_dir=self._workers_dir,
            cache_dir=self._cache_dir,
            worker_token=self._models.worker_token if self._models is not None else None,
        )
        return {name: self._factory(pool, context) for name, pool in self.pools.items()}

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._opened:
            raise FleetClosed("a FleetManager can be entered once")
        stack = AsyncExitStack()
        try:
            installation = await self._store.installation_id()
            if not INSTALLATION_ID.match(installation):
                raise FleetConfigError(f"the store's installation id {installation!r} is not valid")
            if self._own_http:
                await stack.enter_async_context(self._http)
            self._providers.update(self._build_providers(installation))
            for provider in self._providers.values():
                await stack.enter_async_context(provider)
            await self._registry.load_from_store()
            for name, pool in self.pools.items():
                if self._models is not None and pool.models:
                    self._models.pin(
                        f"pool:{name}", pool.models
                    )  # never evicted while the pool is configured
        except BaseException:
            await stack.aclose()
            raise
        self.installation_id = installation
        logger.info("fleet_installation installation=%s replica=%s", installation, self._replica_id)
        self._stack = stack
        self._opened = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if not self._opened or self._closed:
            return
        self.stop()
        try:
            await asyncio.shield(self._shutdown())
        finally:
            self._closed = True
            if self._stack is not None:
                await self._stack.aclose()

    async def _shutdown(self) -> None:
        try:
            await self._registry.flush()
        except StoreError as exc:
            logger.warning("fleet_flush_failed error=%s", exc)
        if not self._registry.is_leader:
            return
        doomed = [
            worker
            for worker in self._registry.workers.values()
            if worker.pool in self._providers
            and self._providers[worker.pool].stops_with_control_plane
            and worker.state is not WorkerState.TERMINATED
        ]
        if doomed:
            logger.info("fleet_shutdown_terminating count=%d", len(doomed))
            async with asyncio.TaskGroup() as tg:
                for worker in doomed:
                    self._registry.inflight.discard(worker.id)
                    tg.create_task(
                        self._reconciler.terminate(worker, "comfyfleet is shutting down"),
                        name=f"stop-{worker.id}",
                    )

    def _check_open(self) -> None:
        if not self._opened:
            raise FleetClosed("the fleet manager is not open: use `async with FleetManager(...)`")
        if self._closed:
            raise FleetClosed("the fleet manager is closed")

    def stop(self) -> None:
        """Ask :meth:`run` to return (workers are handled by ``__aexit__``)."""
        self._signals.stop_all()

    @property
    def replica_id(self) -> str:
        return self._replica_id

    @property
    def is_leader(self) -> bool:
        return self._registry.is_leader

    @property
    def reconcile_passes(self) -> int:
        """Completed reconciler passes (leader or not), for tests and metrics."""
        return self._reconciler.passes

    async def wait_ready(self) -> None:
        """Return once the first reconcile pass ran (leadership known, static workers recorded)."""
        await self._reconciler.ready.wait()

    async def run(self) -> None:
        """Probes, the reconciler (when leader), the reaper, the store listener and the write-behind flusher.
        Returns after :meth:`stop`; a loop that dies takes the others down with its exception."""
        self._check_open()
        self._signals.reconcile.set()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._reconciler.run(), name="fleet-reconciler")
                tg.create_task(self._prober.run(), name="fleet-probes")
                tg.create_task(self._registry.flush_loop(), name="fleet-flusher")
                listener = tg.create_task(self._registry.listen_loop(), name="fleet-listener")
                await self._signals.stop.wait()
                listener.cancel()
                # Starts and stops in flight finish (their records must not be left half-written); probes
                # have nothing to finish.
                self._prober.cancel_checks()
        finally:
            self._tg = None

    def _spawn(self, operation: Coroutine[Any, Any, None], key: str) -> asyncio.Task[None] | None:
        if self._tg is None:
            operation.close()
            return None
        return self._tg.create_task(operation, name=f"fleet-op-{key}")

    # -- WorkerDirectory (the registry's) ---------------------------------------------------------------------

    def usable_workers(self) -> Sequence[Worker]:
        """Workers ``idle``/``busy``, probed by this process, not suspected. The objects are the manager's
        own: read them, do not change them."""
        return self._registry.usable_workers()

    def prefetch(self, worker: Worker) -> int:
        return self._registry.prefetch(worker)

    async def wait_changed(self) -> None:
        await self._registry.wait_changed()

    async def set_assignments(self, worker_id: str, task_ids: Sequence[str]) -> None:
        await self._registry.set_assignments(worker_id, task_ids)

    async def note_loaded_models(self, worker_id: str, models: Sequence[str]) -> None:
        await self._registry.note_loaded_models(worker_id, models)

    async def report_unreachable(self, worker_id: str, reason: str) -> None:
        await self._registry.report_unreachable(worker_id, reason)

    async def recycle(self, worker_id: str, reason: str) -> None:
        await self._registry.recycle(worker_id, reason)

    # -- operator actions (the API) ---------------------------------------------------------------------------

    def workers(self, *, pool: str | None = None) -> list[Worker]:
        return self._registry.of_pool(pool)

    def worker(self, worker_id: str) -> Worker:
        """Raises :class:`UnknownWorker`."""
        return self._registry.get(worker_id)

    async def metrics(self) -> WorkerMetrics:
        return await self._store.worker_metrics()

    async def drain(self, worker_id: str) -> Worker:
        """Stop giving the worker tasks; it is terminated once the tasks it holds are done (a static worker
        stays ``draining`` until :meth:`undrain`). One still starting (or failed) is removed instead."""
        self._check_open()
        worker = await self._registry.fresh(worker_id)
        if worker.state in (WorkerState.DRAINING, WorkerState.TERMINATING, WorkerState.TERMINATED):
            return worker
        if worker.state in (WorkerState.PENDING, WorkerState.STARTING, WorkerState.FAILED):
            return await self.remove(worker_id)
        await self._registry.drain(worker)
        return worker

    async def undrain(self, worker_id: str) -> Worker:
        """Take a ``draining`` worker back: it returns to ``idle`` (``busy`` while it holds tasks) and gets
        new tasks again once its health probe passes (at once when the last one did). A worker that is not
        draining (``pending``, ``starting``, ``idle``, ``busy``) is returned as it is. On a follower replica
        the request is left on the record for the leader, and the worker is returned still ``draining``.

        Raises :class:`UnknownWorker`, and :class:`WorkerStateConflict` when the worker is ``failed``,
        ``terminating`` or ``terminated``, or its termination has already begun (a drained worker holding no
        task is terminated within a reconcile pass; a static one is never terminated)."""
        self._check_open()
        worker = await self._registry.fresh(worker_id)
        if worker.state in (WorkerState.PENDING, WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY):
            return worker
        if worker.state is not WorkerState.DRAINING:
            raise WorkerStateConflict(f"worker {worker_id!r} is {worker.state.value}: it cannot be undrained")
        await self._registry.undrain(worker)
        return worker

    async def remove(self, worker_id: str) -> Worker:
        """Terminate the worker now (its running attempts are retried elsewhere by the dispatcher)."""
        self._check_open()
        worker = await self._registry.fresh(worker_id)
        if self.pools.get(worker.pool) is not None and self.pools[worker.pool].provider == "static":
            raise WorkerStateConflict(
                f"worker {worker_id!r} is a static URL: remove it from the configuration instead"
            )
        if worker.state is WorkerState.TERMINATED:
            return worker
        if not self._registry.is_leader:
            await self._registry.request_from_leader(worker, TERMINATE_REQUESTED, "removed by request")
            return worker
        if worker.id in self._registry.inflight:
            # Its start is still running: the reconciler stops it once the provider has answered.
            worker.info[TERMINATE_REQUESTED] = "removed by request"
            return worker
        await self._reconciler.terminate(worker, "removed by request")
        return worker

    # -- the reconciler's view --------------------------------------------------------------------------------

    async def reap(self) -> int:
        """Terminate provider instances of this installation that no record knows; prune old terminated
        records. Returns how many instances were reaped."""
        return await self._reaper.reap()

    def pool_for_task(self, pool: str | None) -> str | None:
        """The pool whose demand a task with this ``pool`` field counts in (a pool name or one of its labels)."""
        return self._reconciler.pool_for_task(pool)

    def snapshot(self, pool_name: str, demand: Demand) -> PoolSnapshot:
        """What :func:`decide` sees of one pool, given ``store.demand_by_pool()``."""
        return self._reconciler.snapshot(pool_name, demand)
