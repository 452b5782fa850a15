"""The worker manager: one provider per pool, worker records in the store, health probes, the autoscaler's
reconciler and the reaper. :class:`FleetManager` implements the dispatcher's ``WorkerDirectory``.

Lifecycle (see DESIGN.md "Workers and providers")::

    pending → starting → idle ⇄ busy → draining → terminating → terminated   (+ failed)

- A new worker is written to the store as ``pending`` *before* the provider is asked for it, and as
  ``starting`` with the provider's id as soon as ``create`` returns, so a crash never leaks an instance: the
  next start (or the new leader) rediscovers it from the store and the provider's ``list_ours``, adopts what
  matches and reaps what does not.
- A worker becomes ``idle`` only after its ComfyUI answered ``/system_stats`` in this process (its node types
  are read from ``/object_info`` at that moment). ``failure_threshold`` failed probes in a row, or the provider
  reporting the instance failed or gone, make it ``failed``; the reconciler then terminates it and, if there
  is demand, the autoscaler starts a replacement. The dispatcher sees the worker leave ``usable_workers`` (and
  :meth:`FleetManager.wait_changed` returns), so its attempts go back for retry.
- With several replicas (PostgreSQL) only the one holding ``store.try_leader("autoscaler")`` probes, starts,
  stops and reaps; the others follow the store (``workers`` notifications plus a slow refresh).

Use::

    async with FleetManager(settings, store) as fleet:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(fleet.run(), name="fleet")   # returns after fleet.stop(); or cancel it
            ...

``run`` needs the store to be open and migrated. Leaving the context terminates the workers of providers
whose workers cannot outlive comfyfleet (``process``); containers and cloud instances are left running for
the next start to adopt (an idle one is stopped by the autoscaler after ``idle_timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from comfyfleet import metrics
from comfyfleet.domain import Worker, WorkerMetrics, WorkerState, can_transition_worker
from comfyfleet.fleet.autoscaler import (
    Hold,
    PoolSnapshot,
    ScalingPolicy,
    StartWorkers,
    StopWorker,
    WorkerView,
    decide,
)
from comfyfleet.fleet.errors import (
    FleetClosed,
    FleetConfigError,
    UnknownWorker,
    WorkerStateConflict,
)
from comfyfleet.fleet.health import HealthProber
from comfyfleet.fleet.providers import Instance, InstanceState, Provider, ProviderContext, build_provider
from comfyfleet.fleet.warmup import run_warmup
from comfyfleet.store.base import NotFound, StoreError

if TYPE_CHECKING:
    from comfyfleet.config import PoolConfig, Settings
    from comfyfleet.store.base import Store

logger = logging.getLogger(__name__)

LEADER_LOCK = "autoscaler"
NOTIFY_CHANNEL = "workers"
POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*(?:-[A-Za-z0-9_.]+)*$")
_STARTING_PROBE_S = 0.25  # a booting worker is probed often so it is used the moment it answers
_MAX_LOADED_MODELS = 64
_MIN_RECONCILE_GAP_S = 0.05
_ACTIVE_STATES = frozenset({WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY, WorkerState.DRAINING})
_GONE_STATES = frozenset({InstanceState.GONE, InstanceState.FAILED, InstanceState.STOPPED})

ProviderFactory = Callable[["PoolConfig"], Provider]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_worker_id(pool: str) -> str:
    """``<pool>-<10 hex>``: providers put it in labels / names, so an instance can be tied back to its record."""
    return f"{pool}-{secrets.token_hex(5)}"


def pools_from_settings(settings: Settings) -> dict[str, PoolConfig]:
    """The configured pools by name; ``workers: [urls]`` becomes the static pool ``default``."""
    from comfyfleet.config import PoolConfig

    pools: dict[str, PoolConfig] = {}
    if settings.workers:
        if any(pool.name == "default" for pool in settings.pools):
            raise FleetConfigError(
                "`workers` makes a static pool named 'default'; a pool of that name is also configured"
            )
        pools["default"] = PoolConfig(
            name="default",
            provider="static",
            min_workers=len(settings.workers),
            max_workers=len(settings.workers),
            settings={"urls": list(settings.workers)},
        )
    for pool in settings.pools:
        if not POOL_NAME.match(pool.name) or len(pool.name) > 40:
            raise FleetConfigError(
                f"pool name {pool.name!r}: use letters, digits, '_', '.' and single '-' between them (at most 40)"
            )
        pools[pool.name] = pool
    return pools


@dataclasses.dataclass(slots=True)
class _PoolTracker:
    """The reconciler's memory of one pool (leader-local; a new leader starts fresh, which is safe)."""

    last_scale_up_at: datetime | None = None
    last_scale_down_at: datetime | None = None
    failed_starts: int = 0
    last_failed_start_at: datetime | None = None


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
    ) -> None:
        self._settings = settings
        self._fleet = settings.fleet
        self._store = store
        self._replica_id = replica_id or settings.replica_id or uuid.uuid4().hex[:12]
        self.pools: dict[str, PoolConfig] = pools_from_settings(settings)
        context = ProviderContext(namespace=self._fleet.namespace, state_dir=Path("comfyfleet-workers"))
        factory = provider_factory or (lambda pool: build_provider(pool, context))
        # Built now so a bad pool fails at start-up with a message naming it, not on the first scale-up.
        self._providers: dict[str, Provider] = {name: factory(pool) for name, pool in self.pools.items()}
        self._policies = {
            name: ScalingPolicy.for_pool(pool, self._fleet) for name, pool in self.pools.items()
        }
        self._pool_by_label: dict[str, str] = {}
        for name, pool in self.pools.items():
            for label in pool.labels:
                self._pool_by_label.setdefault(label, name)
        self._default_pool = self._fleet.default_pool or next(
            (name for name, pool in self.pools.items() if pool.provider != "static"), None
        )
        if self._default_pool is not None and self._default_pool not in self.pools:
            raise FleetConfigError(f"fleet.default_pool {self._default_pool!r} is not a configured pool")

        self._workers: dict[str, Worker] = {}
        self._verified: set[str] = set()  # answered a probe in this process: may be handed to the dispatcher
        self._suspect: set[str] = (
            set()
        )  # the dispatcher could not reach it; not handed out until a probe passes
        self._inflight: set[str] = set()  # a start or stop is running for it
        self._checking: set[str] = set()  # a health check is running for it
        self._check_tasks: set[asyncio.Task[None]] = set()
        self._terminate_retry_at: dict[str, float] = {}  # back-off of failed terminations
        self._next_check: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._trackers = {name: _PoolTracker() for name in self.pools}
        self._prober = prober or HealthProber(timeout_s=self._fleet.probe_timeout_s)
        self._own_prober = prober is None
        self._stack: AsyncExitStack | None = None
        self._opened = False
        self._closed = False
        self._is_leader = False
        self._rediscovered: set[str] = set()
        self._last_reap = 0.0
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self._probe_wake = asyncio.Event()
        self._reconcile_wake = asyncio.Event()
        self._flush_wake = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._never = asyncio.Event()  # set only by stop(): a plain timer that still ends at shutdown
        self.reconcile_passes = 0  # completed reconciler passes (leader or not), for tests and metrics

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._opened:
            raise FleetClosed("a FleetManager can be entered once")
        stack = AsyncExitStack()
        try:
            if self._own_prober:
                await stack.enter_async_context(self._prober)
            for provider in self._providers.values():
                await stack.enter_async_context(provider)
            await self._load_from_store()
        except BaseException:
            await stack.aclose()
            raise
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
            await self._flush()
        except StoreError as exc:
            logger.warning("fleet_flush_failed error=%s", exc)
        if not self._is_leader:
            return
        doomed = [
            worker
            for worker in self._workers.values()
            if worker.pool in self._providers
            and self._providers[worker.pool].stops_with_control_plane
            and worker.state not in (WorkerState.TERMINATED,)
        ]
        if doomed:
            logger.info("fleet_shutdown_terminating count=%d", len(doomed))
            async with asyncio.TaskGroup() as tg:
                for worker in doomed:
                    self._inflight.discard(worker.id)
                    tg.create_task(
                        self._terminate(worker, "comfyfleet is shutting down"), name=f"stop-{worker.id}"
                    )

    def _check_open(self) -> None:
        if not self._opened:
            raise FleetClosed("the fleet manager is not open: use `async with FleetManager(...)`")
        if self._closed:
            raise FleetClosed("the fleet manager is closed")

    def stop(self) -> None:
        """Ask :meth:`run` to return (workers are handled by ``__aexit__``)."""
        self._stop.set()
        self._wake_all()

    @property
    def replica_id(self) -> str:
        return self._replica_id

    @property
    def is_leader(self) -> bool:
        return self._is_leader

    async def wait_ready(self) -> None:
        """Return once the first reconcile pass ran (leadership known, static workers recorded)."""
        await self._ready.wait()

    async def run(self) -> None:
        """Probes, the reconciler (when leader), the reaper, the store listener and the write-behind flusher.
        Returns after :meth:`stop`; a loop that dies takes the others down with its exception."""
        self._check_open()
        self._reconcile_wake.set()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._reconcile_loop(), name="fleet-reconciler")
                tg.create_task(self._probe_loop(), name="fleet-probes")
                tg.create_task(self._flush_loop(), name="fleet-flusher")
                listener = tg.create_task(self._listen_loop(), name="fleet-listener")
                await self._stop.wait()
                listener.cancel()
                # Starts and stops in flight finish (their records must not be left half-written); probes
                # have nothing to finish.
                for check in list(self._check_tasks):
                    check.cancel()
        finally:
            self._tg = None

    def _wake_all(self) -> None:
        for event in (self._probe_wake, self._reconcile_wake, self._flush_wake, self._never):
            event.set()

    async def _wait(self, event: asyncio.Event, timeout_s: float) -> None:
        """Wait for ``event`` or ``timeout_s``, whichever comes first (``stop`` sets every wake event)."""
        if not event.is_set() and not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await event.wait()
        event.clear()

    # -- WorkerDirectory --------------------------------------------------------------------------------------

    def usable_workers(self) -> Sequence[Worker]:
        """Workers ``idle``/``busy``, probed by this process, not suspected. The objects are the manager's
        own: read them, do not change them."""
        return [
            worker
            for worker in self._workers.values()
            if worker.state in (WorkerState.IDLE, WorkerState.BUSY)
            and worker.endpoint
            and worker.id in self._verified
            and worker.id not in self._suspect
            and worker.pool in self.pools
        ]

    def prefetch(self, worker: Worker) -> int:
        pool = self.pools.get(worker.pool)
        return pool.prefetch if pool is not None else 0

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def _signal_changed(self) -> None:
        # Waiters of the current generation are woken; the next wait_changed() waits for a new change.
        self._changed.set()
        self._changed = asyncio.Event()

    async def set_assignments(self, worker_id: str, task_ids: Sequence[str]) -> None:
        worker = self._workers.get(worker_id)
        if worker is None:
            return
        given = len(set(task_ids) - set(worker.current_task_ids))
        if given:
            worker.info["tasks_given"] = int(worker.info.get("tasks_given", 0)) + given
        worker.current_task_ids = list(task_ids)
        worker.last_active_at = utcnow()
        if worker.state in (WorkerState.IDLE, WorkerState.BUSY):
            target = WorkerState.BUSY if task_ids else WorkerState.IDLE
            if target is not worker.state:
                worker.state = target
        worker.updated_at = utcnow()
        self._mark_dirty(worker)
        pool = self.pools.get(worker.pool)
        if (
            given
            and pool is not None
            and pool.provider != "static"
            and 0 < pool.recycle_after_tasks <= worker.info["tasks_given"]
            and worker.state in (WorkerState.IDLE, WorkerState.BUSY)
        ):
            # It finishes what it holds, takes nothing new, and the autoscaler starts a fresh one if needed.
            worker.info["recycled_after_tasks"] = worker.info["tasks_given"]
            logger.info("worker_recycle worker_id=%s tasks=%s", worker.id, worker.info["tasks_given"])
            await self.drain(worker.id)

    async def note_loaded_models(self, worker_id: str, models: Sequence[str]) -> None:
        worker = self._workers.get(worker_id)
        if worker is None or not models:
            return
        recent = [name for name in worker.loaded_models if name not in models] + list(models)
        recent = recent[-_MAX_LOADED_MODELS:]
        if recent != worker.loaded_models:
            worker.loaded_models = recent
            self._mark_dirty(worker)

    async def report_unreachable(self, worker_id: str, reason: str) -> None:
        worker = self._workers.get(worker_id)
        if worker is None:
            return
        logger.warning("worker_reported_unreachable worker_id=%s reason=%s", worker_id, reason)
        if worker.id not in self._suspect:
            self._suspect.add(worker.id)
            self._signal_changed()
        self._next_check[worker.id] = 0.0
        self._probe_wake.set()
        if not self._is_leader:
            await self._notify(f"probe:{worker_id}")

    async def recycle(self, worker_id: str, reason: str) -> None:
        worker = self._workers.get(worker_id)
        if worker is None:
            return
        logger.warning("worker_recycle worker_id=%s reason=%s", worker_id, reason)
        if self._is_leader:
            await self._fail(worker, f"recycled: {reason}")
        else:
            await self._request_from_leader(worker, "terminate_requested", reason)

    # -- operator actions (the API) ---------------------------------------------------------------------------

    def workers(self, *, pool: str | None = None) -> list[Worker]:
        return [worker for worker in self._workers.values() if pool is None or worker.pool == pool]

    def worker(self, worker_id: str) -> Worker:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise UnknownWorker(f"no worker {worker_id!r}")
        return worker

    async def metrics(self) -> WorkerMetrics:
        return await self._store.worker_metrics()

    async def drain(self, worker_id: str) -> Worker:
        """Stop giving the worker tasks; it is terminated once the tasks it holds are done."""
        self._check_open()
        worker = await self._fresh(worker_id)
        if worker.state in (WorkerState.DRAINING, WorkerState.TERMINATING, WorkerState.TERMINATED):
            return worker
        if worker.state in (WorkerState.PENDING, WorkerState.STARTING, WorkerState.FAILED):
            return await self.remove(worker_id)
        if not self._is_leader:
            await self._request_from_leader(worker, "drain_requested", "drain requested")
            return worker
        self._transition(worker, WorkerState.DRAINING)
        await self._write(worker)
        self._signal_changed()
        self._reconcile_wake.set()
        logger.info("worker_draining worker_id=%s", worker_id)
        return worker

    async def remove(self, worker_id: str) -> Worker:
        """Terminate the worker now (its running attempts are retried elsewhere by the dispatcher)."""
        self._check_open()
        worker = await self._fresh(worker_id)
        if self.pools.get(worker.pool) is not None and self.pools[worker.pool].provider == "static":
            raise WorkerStateConflict(
                f"worker {worker_id!r} is a static URL: remove it from the configuration instead"
            )
        if worker.state is WorkerState.TERMINATED:
            return worker
        if not self._is_leader:
            await self._request_from_leader(worker, "terminate_requested", "removed by request")
            return worker
        if worker.id in self._inflight:
            # Its start is still running: the reconciler stops it once the provider has answered.
            worker.info["terminate_requested"] = "removed by request"
            return worker
        await self._terminate(worker, "removed by request")
        return worker

    async def _fresh(self, worker_id: str) -> Worker:
        worker = self._workers.get(worker_id)
        if worker is not None:
            return worker
        try:
            return await self._store.get_worker(worker_id)
        except NotFound:
            raise UnknownWorker(f"no worker {worker_id!r}") from None

    # -- store ------------------------------------------------------------------------------------------------

    async def _load_from_store(self) -> None:
        workers = await self._store.list_workers()
        self._workers = {
            worker.id: worker for worker in workers if worker.state is not WorkerState.TERMINATED
        }
        for worker in self._workers.values():
            if worker.pool not in self.pools:
                logger.warning("worker_pool_unknown worker_id=%s pool=%s", worker.id, worker.pool)

    async def _write(self, worker: Worker) -> None:
        """Write-through: the record as it is now in memory."""
        self._dirty.discard(worker.id)
        async with self._write_lock:
            await self._store.upsert_worker(dataclasses.replace(worker))
        await self._notify(worker.id)

    def _mark_dirty(self, worker: Worker) -> None:
        self._dirty.add(worker.id)
        self._flush_wake.set()

    async def _flush(self) -> None:
        """Write the batched assignment / loaded-model changes. The leader owns the records; a follower
        only merges its assignment fields into the stored record, so a stale copy of its own can never undo
        the leader's lifecycle changes (or bring a terminated worker back)."""
        written: list[str] = []
        while self._dirty:
            worker_id = self._dirty.pop()
            worker = self._workers.get(worker_id)
            if worker is None:
                continue
            try:
                async with self._write_lock:
                    if self._is_leader:
                        await self._store.upsert_worker(dataclasses.replace(worker))
                    else:
                        try:
                            record = await self._store.get_worker(worker_id)
                        except NotFound:
                            continue
                        if record.state is WorkerState.TERMINATED:
                            continue
                        record.current_task_ids = list(worker.current_task_ids)
                        record.last_active_at = worker.last_active_at
                        record.loaded_models = list(worker.loaded_models)
                        await self._store.upsert_worker(record)
                written.append(worker_id)
            except StoreError:
                self._dirty.add(worker_id)
                raise
        if written and self._is_leader:
            await self._notify("")  # followers re-read the records
        for worker_id in [] if self._is_leader else written:
            await self._notify(worker_id)  # the leader merges this worker's assignments

    async def _flush_loop(self) -> None:
        while not self._stop.is_set():
            await self._wait(self._flush_wake, 1.0)
            try:
                await self._flush()
            except StoreError as exc:
                logger.warning("fleet_flush_failed error=%s", exc)

    async def _notify(self, payload: str) -> None:
        try:
            await self._store.notify(NOTIFY_CHANNEL, f"{self._replica_id}:{payload}")
        except StoreError as exc:
            logger.warning("fleet_notify_failed error=%s", exc)

    async def _request_from_leader(self, worker: Worker, flag: str, reason: str) -> None:
        """From a non-leader replica: leave the request on the record for the leader to carry out."""
        record = await self._store.get_worker(worker.id)
        record.info[flag] = reason
        await self._store.upsert_worker(record)
        await self._notify(worker.id)

    async def _listen_loop(self) -> None:
        async for note in self._store.listen():
            if note.channel in ("tasks", "task") or note.channel.startswith("tasks"):
                self._reconcile_wake.set()
                continue
            if note.channel != NOTIFY_CHANNEL:
                continue
            sender, _, payload = note.payload.partition(":")
            if sender == self._replica_id:
                continue
            if payload.startswith("probe:"):
                self._next_check[payload.removeprefix("probe:")] = 0.0
                self._probe_wake.set()
            elif payload:
                await self._merge_from_store(payload)
            elif not self._is_leader:
                await self._refresh_from_store()

    async def _merge_from_store(self, worker_id: str) -> None:
        try:
            record = await self._store.get_worker(worker_id)
        except NotFound:
            self._workers.pop(worker_id, None)
            self._signal_changed()
            return
        except StoreError as exc:
            logger.warning("fleet_refresh_failed error=%s", exc)
            return
        if not self._is_leader:
            self._adopt_record(record)
            return
        # The leader owns lifecycle fields; another replica only reports assignments and requests.
        worker = self._workers.get(worker_id)
        if worker is None:
            return
        worker.current_task_ids = record.current_task_ids
        worker.last_active_at = record.last_active_at or worker.last_active_at
        worker.loaded_models = record.loaded_models or worker.loaded_models
        if worker.state in (WorkerState.IDLE, WorkerState.BUSY):
            worker.state = WorkerState.BUSY if worker.current_task_ids else WorkerState.IDLE
        if record.info.get("terminate_requested") and worker.state is not WorkerState.TERMINATING:
            worker.info["terminate_requested"] = record.info["terminate_requested"]
            self._reconcile_wake.set()
        if record.info.get("drain_requested") and worker.state in (WorkerState.IDLE, WorkerState.BUSY):
            self._transition(worker, WorkerState.DRAINING)
            await self._write(worker)
            self._signal_changed()

    def _adopt_record(self, record: Worker) -> None:
        before = self._workers.get(record.id)
        if record.state is WorkerState.TERMINATED:
            self._workers.pop(record.id, None)
        else:
            self._workers[record.id] = record
            if record.state in (WorkerState.IDLE, WorkerState.BUSY) and record.health_failures == 0:
                self._verified.add(record.id)  # the leader probed it
        if before is None or before.state != record.state or before.endpoint != record.endpoint:
            self._signal_changed()

    async def _refresh_from_store(self) -> None:
        try:
            records = await self._store.list_workers()
        except StoreError as exc:
            logger.warning("fleet_refresh_failed error=%s", exc)
            return
        seen = set()
        for record in records:
            seen.add(record.id)
            self._adopt_record(record)
        for worker_id in [worker_id for worker_id in self._workers if worker_id not in seen]:
            self._workers.pop(worker_id)
            self._signal_changed()

    # -- state changes ----------------------------------------------------------------------------------------

    def _transition(self, worker: Worker, target: WorkerState) -> bool:
        if not can_transition_worker(worker.state, target):
            logger.warning(
                "worker_transition_refused worker_id=%s from=%s to=%s", worker.id, worker.state, target
            )
            return False
        if worker.state is not target:
            logger.info(
                "worker_state worker_id=%s pool=%s from=%s to=%s",
                worker.id,
                worker.pool,
                worker.state,
                target,
            )
        worker.state = target
        worker.updated_at = utcnow()
        return True

    async def _fail(self, worker: Worker, reason: str, *, start_failure: bool = False) -> None:
        if worker.state in (WorkerState.FAILED, WorkerState.TERMINATING, WorkerState.TERMINATED):
            return
        worker.error = reason
        if not self._transition(worker, WorkerState.FAILED):
            return
        self._verified.discard(worker.id)
        logger.warning("worker_failed worker_id=%s pool=%s reason=%s", worker.id, worker.pool, reason)
        if start_failure:
            tracker = self._trackers[worker.pool]
            tracker.failed_starts += 1
            tracker.last_failed_start_at = utcnow()
        # Signalled before the write: the worker left usable_workers() the moment its state changed.
        self._signal_changed()
        self._reconcile_wake.set()
        await self._write(worker)

    async def _terminate(self, worker: Worker, reason: str) -> None:
        if worker.id in self._inflight or worker.state is WorkerState.TERMINATED:
            return
        self._inflight.add(worker.id)
        try:
            if worker.state is not WorkerState.TERMINATING:
                self._transition(worker, WorkerState.TERMINATING)
                worker.info["stop_reason"] = reason
                self._verified.discard(worker.id)
                await self._write(worker)
                self._signal_changed()
            logger.info("worker_terminating worker_id=%s pool=%s reason=%s", worker.id, worker.pool, reason)
            provider = self._providers.get(worker.pool)
            if provider is not None and worker.provider_id is not None:
                try:
                    await provider.terminate(worker.provider_id)
                except Exception as exc:
                    # Stays `terminating`: the reconciler tries again (backing off), so nothing is leaked.
                    failures = int(worker.info.get("terminate_failures", 0)) + 1
                    worker.info["terminate_failures"] = failures
                    self._terminate_retry_at[worker.id] = time.monotonic() + min(2.0**failures, 60.0)
                    logger.warning(
                        "worker_terminate_failed worker_id=%s failures=%d error=%s", worker.id, failures, exc
                    )
                    return
            self._transition(worker, WorkerState.TERMINATED)
            worker.current_task_ids = []
            await self._write(worker)
            self._workers.pop(worker.id, None)
            self._next_check.pop(worker.id, None)
            self._terminate_retry_at.pop(worker.id, None)
            self._suspect.discard(worker.id)
            self._signal_changed()
            self._reconcile_wake.set()  # a replacement held back by max_workers may start now
            logger.info("worker_terminated worker_id=%s pool=%s", worker.id, worker.pool)
        finally:
            self._inflight.discard(worker.id)

    async def _start_worker(self, pool_name: str) -> None:
        pool = self.pools[pool_name]
        provider = self._providers[pool_name]
        now = utcnow()
        worker = Worker(
            id=new_worker_id(pool_name),
            pool=pool_name,
            provider=pool.provider,
            state=WorkerState.PENDING,
            created_at=now,
            updated_at=now,
        )
        self._workers[worker.id] = worker
        self._inflight.add(worker.id)
        try:
            # Recorded before the provider is asked, so a crash between the two is found again.
            await self._write(worker)
            logger.info(
                "worker_creating worker_id=%s pool=%s provider=%s", worker.id, pool_name, pool.provider
            )
            try:
                handle = await provider.create(worker.id)
            except Exception as exc:
                logger.warning(
                    "worker_create_failed worker_id=%s pool=%s error=%s", worker.id, pool_name, exc
                )
                worker.error = f"create failed: {exc}"
                tracker = self._trackers[pool_name]
                tracker.failed_starts += 1
                tracker.last_failed_start_at = utcnow()
                self._transition(worker, WorkerState.FAILED)
                self._transition(worker, WorkerState.TERMINATED)
                await self._write(worker)
                self._workers.pop(worker.id, None)
                self._reconcile_wake.set()
                return
            worker.provider_id = handle.provider_id
            worker.endpoint = handle.endpoint
            worker.info.update(handle.info)
            self._transition(worker, WorkerState.STARTING)
            await self._write(worker)
            logger.info(
                "worker_starting worker_id=%s pool=%s provider_id=%s",
                worker.id,
                pool_name,
                handle.provider_id,
            )
        finally:
            self._inflight.discard(worker.id)
        self._next_check[worker.id] = 0.0
        self._probe_wake.set()

    # -- health probes ----------------------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        tick = min(_STARTING_PROBE_S, self._fleet.probe_interval_s)
        while not self._stop.is_set():
            await self._wait(self._probe_wake, tick)
            if not self._is_leader or self._stop.is_set():
                continue
            now = time.monotonic()
            due = [
                worker
                for worker in list(self._workers.values())
                if worker.state in _ACTIVE_STATES
                and worker.id not in self._inflight
                and worker.pool in self.pools
                and self._next_check.get(worker.id, 0.0) <= now
            ]
            # Each check runs on its own: a provider that is slow to answer (retrying through an outage)
            # must not hold up the probes of every other worker.
            for worker in due:
                if worker.id not in self._checking:
                    self._checking.add(worker.id)
                    task = self._spawn(self._check(worker), f"probe-{worker.id}")
                    if task is None:
                        self._checking.discard(worker.id)
                    else:
                        self._check_tasks.add(task)
                        task.add_done_callback(self._check_tasks.discard)

    async def _check(self, worker: Worker) -> None:
        try:
            if worker.state is WorkerState.STARTING:
                await self._check_starting(worker)
            else:
                await self._check_live(worker)
        except StoreError as exc:
            logger.warning("worker_probe_store_error worker_id=%s error=%s", worker.id, exc)
        finally:
            self._checking.discard(worker.id)

    async def _describe(self, worker: Worker) -> Instance | None:
        provider = self._providers[worker.pool]
        if worker.provider_id is None:
            return None
        try:
            return await provider.describe(worker.provider_id)
        except Exception as exc:
            logger.warning("worker_describe_failed worker_id=%s error=%s", worker.id, exc)
            return None

    async def _check_starting(self, worker: Worker) -> None:
        pool = self.pools[worker.pool]
        self._next_check[worker.id] = time.monotonic() + _STARTING_PROBE_S
        age = (utcnow() - worker.created_at).total_seconds()
        if age > pool.startup_timeout_s:
            await self._fail(worker, f"not ready after {pool.startup_timeout_s:g}s", start_failure=True)
            return
        if worker.endpoint is None:
            # Only the provider knows where it will answer (a cloud instance still provisioning).
            self._next_check[worker.id] = time.monotonic() + self._fleet.probe_interval_s
            instance = await self._describe(worker)
            if instance is None:
                return
            if instance.state in _GONE_STATES:
                await self._fail(worker, self._instance_problem(instance), start_failure=True)
                return
            if instance.endpoint is None:
                if instance.raw_state and worker.info.get("provider_state") != instance.raw_state:
                    worker.info["provider_state"] = instance.raw_state
                    await self._write(worker)
                return
            worker.endpoint = instance.endpoint
            worker.info["provider_state"] = instance.raw_state or instance.state.value
            await self._write(worker)
        result = await self._prober.probe(worker.endpoint)
        if not result.ok:
            instance = await self._describe(worker)
            if instance is not None and instance.state in _GONE_STATES:
                await self._fail(worker, self._instance_problem(instance), start_failure=True)
            return
        node_types = await self._prober.node_types(worker.endpoint)
        if node_types is None:
            return  # answered /system_stats but not /object_info yet: still starting
        worker.node_types = node_types
        warm = pool.warmup is None or worker.info.get("warmup", {}).get("state") == "done"
        if not warm and not await self._warm_up(worker, pool.warmup or {}, pool.startup_timeout_s - age):
            return
        worker.health_failures = 0
        worker.error = None
        worker.last_active_at = utcnow()
        worker.info["ready_at"] = worker.last_active_at.isoformat()
        worker.info["startup_s"] = round((worker.last_active_at - worker.created_at).total_seconds(), 3)
        if result.system_stats is not None:
            worker.info["system"] = result.system_stats.get("system", {})
        if not self._transition(worker, WorkerState.BUSY if worker.current_task_ids else WorkerState.IDLE):
            return
        self._verified.add(worker.id)
        self._suspect.discard(worker.id)
        self._trackers[worker.pool].failed_starts = 0
        self._next_check[worker.id] = time.monotonic() + self._fleet.probe_interval_s
        await self._write(worker)
        metrics.observe_worker_startup(worker.pool, worker.info["startup_s"])
        logger.info(
            "worker_ready worker_id=%s pool=%s endpoint=%s startup_s=%s",
            worker.id,
            worker.pool,
            worker.endpoint,
            worker.info["startup_s"],
        )
        self._signal_changed()

    async def _warm_up(self, worker: Worker, graph: dict[str, Any], budget_s: float) -> bool:
        """Run the pool's warm-up ``graph`` on a starting worker that answers; True once it has run."""
        if worker.endpoint is None:
            return False
        worker.info["warmup"] = {"state": "running"}
        await self._write(worker)
        outcome = await run_warmup(worker.endpoint, graph, worker.node_types or [], budget_s)
        if not outcome.ok:
            worker.info["warmup"] = {"state": "failed", "error": outcome.error, "seconds": outcome.seconds}
            if outcome.fatal:
                await self._fail(worker, outcome.error or "warm-up failed", start_failure=True)
            else:
                logger.warning("worker_warmup_retry worker_id=%s error=%s", worker.id, outcome.error)
                await self._write(worker)
            return False
        worker.info["warmup"] = {"state": "done", "seconds": outcome.seconds}
        worker.loaded_models = list(outcome.models)[-_MAX_LOADED_MODELS:]
        logger.info(
            "worker_warmed_up worker_id=%s seconds=%s models=%s", worker.id, outcome.seconds, outcome.models
        )
        return True

    async def _check_live(self, worker: Worker) -> None:
        self._next_check[worker.id] = time.monotonic() + self._fleet.probe_interval_s
        if worker.endpoint is None:
            await self._fail(worker, "no endpoint known")
            return
        result = await self._prober.probe(worker.endpoint)
        if result.ok:
            newly_usable = worker.id not in self._verified or worker.id in self._suspect
            self._verified.add(worker.id)
            self._suspect.discard(worker.id)
            if worker.node_types is None:
                worker.node_types = await self._prober.node_types(worker.endpoint)
            if worker.health_failures or worker.error:
                worker.health_failures = 0
                worker.error = None
                await self._write(worker)
            if newly_usable:
                self._signal_changed()
            return
        worker.health_failures += 1
        worker.error = result.error
        # A worker that failed once is probed again soon, so the threshold is reached in seconds, not minutes.
        self._next_check[worker.id] = time.monotonic() + min(self._fleet.probe_interval_s, 1.0)
        instance = await self._describe(worker)
        logger.warning(
            "worker_probe_failed worker_id=%s failures=%d error=%s provider_state=%s",
            worker.id,
            worker.health_failures,
            result.error,
            instance.state if instance else None,
        )
        if instance is not None and instance.state in _GONE_STATES:
            await self._fail(worker, f"{self._instance_problem(instance)} (probe: {result.error})")
        elif worker.health_failures >= self._fleet.failure_threshold:
            await self._fail(worker, f"{worker.health_failures} failed health probes: {result.error}")
        else:
            await self._write(worker)

    @staticmethod
    def _instance_problem(instance: Instance) -> str:
        said = f" ({instance.error})" if instance.error else ""
        return f"provider reports the instance {instance.raw_state or instance.state.value}{said}"

    # -- reconciler -------------------------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        last = -math.inf
        while not self._stop.is_set():
            await self._wait(self._reconcile_wake, self._fleet.reconcile_interval_s)
            # Submissions wake this on every task; a burst needs one pass, not one per task.
            gap = _MIN_RECONCILE_GAP_S - (time.monotonic() - last)
            if gap > 0:
                await self._wait(self._never, gap)
            if self._stop.is_set():
                return
            last = time.monotonic()
            try:
                await self._reconcile_once()
            except StoreError as exc:
                logger.warning("fleet_reconcile_store_error error=%s", exc)
            self.reconcile_passes += 1
            self._ready.set()

    async def _reconcile_once(self) -> None:
        leader = await self._store.try_leader(LEADER_LOCK)
        if leader != self._is_leader:
            logger.info("fleet_leadership replica=%s leader=%s", self._replica_id, leader)
            self._is_leader = leader
            self._rediscovered.clear()
            if leader:
                await self._load_from_store()
        if not leader:
            await self._refresh_from_store()
            return
        for pool_name in self.pools:
            if pool_name not in self._rediscovered:
                await self._rediscover(pool_name)
        for worker in list(self._workers.values()):
            if worker.id in self._inflight:
                continue
            wanted_gone = worker.state is WorkerState.TERMINATING or (
                worker.info.get("terminate_requested") and worker.state is not WorkerState.TERMINATED
            )
            if wanted_gone and self._terminate_retry_at.get(worker.id, 0.0) <= time.monotonic():
                reason = str(worker.info.get("terminate_requested") or "retry")
                self._spawn(self._terminate(worker, reason), worker.id)
        demand: dict[str | None, tuple[int, int]] | None = None
        for pool_name, pool in self.pools.items():
            if pool.provider == "static":
                await self._reconcile_static(pool_name)
            else:
                if demand is None:
                    demand = await self._store.demand_by_pool()
                await self._reconcile_pool(pool_name, demand)
        if time.monotonic() - self._last_reap >= self._fleet.reap_interval_s:
            self._last_reap = time.monotonic()
            await self.reap()

    def _spawn(self, operation: Any, key: str) -> asyncio.Task[None] | None:
        if self._tg is None:
            operation.close()
            return None
        task: asyncio.Task[None] = self._tg.create_task(operation, name=f"fleet-op-{key}")
        return task

    async def _rediscover(self, pool_name: str) -> None:
        """Match the store's records of this pool with what the provider has: adopt, forget, reap."""
        provider = self._providers[pool_name]
        try:
            instances = await provider.list_ours()
        except Exception as exc:
            logger.warning("fleet_rediscover_failed pool=%s error=%s", pool_name, exc)
            return
        by_worker = {instance.worker_id: instance for instance in instances if instance.worker_id}
        for worker in [w for w in self._workers.values() if w.pool == pool_name]:
            if worker.id in self._inflight or worker.state is WorkerState.TERMINATED:
                continue
            if worker.provider_id is None:
                found = by_worker.get(worker.id)
                if found is not None and found.state not in (InstanceState.GONE,):
                    worker.provider_id = found.provider_id
                    worker.endpoint = worker.endpoint or found.endpoint
                    provider.adopt(found.provider_id, worker.id)
                    self._transition(worker, WorkerState.STARTING)
                    logger.info("worker_adopted worker_id=%s provider_id=%s", worker.id, found.provider_id)
                else:
                    worker.error = "its start never completed (comfyfleet stopped during create)"
                    self._transition(worker, WorkerState.FAILED)
                    self._transition(worker, WorkerState.TERMINATED)
                    self._workers.pop(worker.id, None)
                await self._write(worker)
                continue
            instance = await self._describe(worker)
            if instance is None:
                continue
            if instance.state is InstanceState.GONE:
                worker.error = worker.error or "the instance disappeared while comfyfleet was away"
                if worker.state is not WorkerState.TERMINATING:
                    self._transition(worker, WorkerState.FAILED)
                self._transition(worker, WorkerState.TERMINATED)
                await self._write(worker)
                self._workers.pop(worker.id, None)
                logger.info("worker_forgotten worker_id=%s reason=gone", worker.id)
                continue
            provider.adopt(worker.provider_id, worker.id)
            if worker.endpoint is None and instance.endpoint:
                worker.endpoint = instance.endpoint
            # Whatever state it was in, it is handed out again only after a probe in this process.
            self._next_check[worker.id] = 0.0
            logger.info(
                "worker_adopted worker_id=%s provider_id=%s state=%s",
                worker.id,
                worker.provider_id,
                worker.state,
            )
        self._rediscovered.add(pool_name)
        await self._reap_pool(pool_name, instances)
        self._signal_changed()
        self._probe_wake.set()

    async def reap(self) -> int:
        """Terminate provider instances that carry our labels / prefix but that no record knows; prune old
        terminated records. Returns how many instances were reaped."""
        reaped = 0
        for pool_name, provider in self._providers.items():
            if self.pools[pool_name].provider == "static":
                continue
            try:
                instances = await provider.list_ours()
            except Exception as exc:
                logger.warning("fleet_reap_list_failed pool=%s error=%s", pool_name, exc)
                continue
            reaped += await self._reap_pool(pool_name, instances)
        await self._prune_terminated()
        return reaped

    async def _reap_pool(self, pool_name: str, instances: Iterable[Instance]) -> int:
        provider = self._providers[pool_name]
        if self.pools[pool_name].provider == "static":
            return 0
        known_workers = {w.id for w in self._workers.values() if w.state is not WorkerState.TERMINATED}
        known_ids = {w.provider_id for w in self._workers.values() if w.provider_id}
        reaped = 0
        for instance in instances:
            if instance.state is InstanceState.GONE:
                continue
            if instance.provider_id in known_ids or (
                instance.worker_id and instance.worker_id in known_workers
            ):
                continue
            if instance.worker_id and await self._store_knows_live(instance.worker_id):
                continue  # another replica's record we have not read yet
            logger.warning(
                "worker_reaped pool=%s provider_id=%s worker_id=%s",
                pool_name,
                instance.provider_id,
                instance.worker_id,
            )
            try:
                await provider.terminate(instance.provider_id)
                reaped += 1
            except Exception as exc:
                logger.warning("worker_reap_failed provider_id=%s error=%s", instance.provider_id, exc)
        return reaped

    async def _store_knows_live(self, worker_id: str) -> bool:
        try:
            record = await self._store.get_worker(worker_id)
        except NotFound:
            return False
        if record.state is WorkerState.TERMINATED:
            return False
        self._workers.setdefault(record.id, record)
        return True

    async def _prune_terminated(self) -> None:
        if self._fleet.keep_terminated_s <= 0:
            return
        now = utcnow()
        for record in await self._store.list_workers(include_gone=True):
            if (
                record.state is WorkerState.TERMINATED
                and (now - record.updated_at).total_seconds() > self._fleet.keep_terminated_s
            ):
                await self._store.delete_worker(record.id)

    async def _reconcile_static(self, pool_name: str) -> None:
        provider = self._providers[pool_name]
        workers = [w for w in self._workers.values() if w.pool == pool_name]
        for worker in workers:
            if worker.state is WorkerState.FAILED and worker.id not in self._inflight:
                # A static server cannot be restarted by us: a fresh record probes it until it answers again.
                await self._terminate(worker, "failed")
        alive = [
            w for w in self._workers.values() if w.pool == pool_name and w.state is not WorkerState.TERMINATED
        ]
        missing = len(await provider.list_ours()) - len(alive)
        for _ in range(max(missing, 0)):
            await self._start_worker(pool_name)

    async def _reconcile_pool(self, pool_name: str, demand: dict[str | None, tuple[int, int]]) -> None:
        snapshot = self.snapshot(pool_name, demand)
        actions = decide(snapshot, self._policies[pool_name])
        tracker = self._trackers[pool_name]
        stops = [action for action in actions if isinstance(action, StopWorker)]
        busy_in_store: set[str] | None = None
        for action in actions:
            if isinstance(action, Hold):
                logger.debug("pool_hold pool=%s reason=%s until=%s", pool_name, action.reason, action.until)
            elif isinstance(action, StartWorkers):
                logger.info(
                    "pool_scale_up pool=%s count=%d reason=%s", pool_name, action.count, action.reason
                )
                tracker.last_scale_up_at = snapshot.now
                for _ in range(action.count):
                    self._spawn(self._start_worker(pool_name), f"start-{pool_name}")
        for action in stops:
            worker = self._workers.get(action.worker_id)
            if worker is None or worker.id in self._inflight:
                continue
            if action.reason not in ("failed",):
                # Never stop a worker that a dispatcher (in any replica) still has a task on.
                if busy_in_store is None:
                    busy_in_store = {
                        task.worker_id for task in await self._store.running_tasks() if task.worker_id
                    }
                if worker.id in busy_in_store:
                    continue
                tracker.last_scale_down_at = snapshot.now
            logger.info("pool_scale_down pool=%s worker_id=%s reason=%s", pool_name, worker.id, action.reason)
            self._spawn(self._terminate(worker, action.reason), worker.id)

    def pool_for_task(self, pool: str | None) -> str | None:
        """The pool whose demand a task with this ``pool`` field counts in (a pool name or one of its labels)."""
        if pool is None:
            return self._default_pool
        if pool in self.pools:
            return pool
        return self._pool_by_label.get(pool)

    def snapshot(self, pool_name: str, demand: dict[str | None, tuple[int, int]]) -> PoolSnapshot:
        """What :func:`decide` sees of one pool, given ``store.demand_by_pool()``."""
        pending = running = 0
        for task_pool, (pool_pending, pool_running) in demand.items():
            if self.pool_for_task(task_pool) == pool_name:
                pending += pool_pending
                running += pool_running
        tracker = self._trackers[pool_name]
        views = tuple(
            WorkerView(
                id=w.id,
                state=w.state,
                created_at=w.created_at,
                last_active_at=w.last_active_at,
                busy=bool(w.current_task_ids) or w.state is WorkerState.BUSY,
            )
            for w in self._workers.values()
            # A start in flight is capacity (pending/starting); a stop in flight is `terminating`, which is not.
            if w.pool == pool_name
        )
        return PoolSnapshot(
            pool=pool_name,
            now=utcnow(),
            pending_tasks=pending,
            running_tasks=running,
            workers=views,
            last_scale_up_at=tracker.last_scale_up_at,
            last_scale_down_at=tracker.last_scale_down_at,
            failed_starts=tracker.failed_starts,
            last_failed_start_at=tracker.last_failed_start_at,
        )
