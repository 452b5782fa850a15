"""The reconciler: holds leadership, and as the leader carries out :func:`autoscaler.decide` for every pool.

With several replicas (PostgreSQL) only the one holding ``store.try_leader("autoscaler")`` starts, stops, probes
and reaps; the others follow the store. On each pass (on a timer, and woken at once by new tasks) the leader:
rediscovers each pool once after taking the lead (:mod:`comfyfleet.fleet.reaper`), finishes the terminations
that were asked for or that failed before, keeps one record per URL of each static pool, runs ``decide`` on each
other pool's snapshot and starts or stops workers through its provider, and reaps every ``reap_interval_s``.

A new worker is written to the store as ``pending`` *before* the provider is asked for it, and as ``starting``
with the provider's id as soon as ``create`` returns, so a crash never leaks an instance.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from comfyfleet.domain import Worker, WorkerState
from comfyfleet.fleet.autoscaler import (
    Hold,
    PoolSnapshot,
    ScalingPolicy,
    StartWorkers,
    StopWorker,
    WorkerView,
    decide,
)
from comfyfleet.fleet.pools import PoolTracker, new_worker_id, utcnow
from comfyfleet.fleet.registry import TERMINATE_REQUESTED
from comfyfleet.store.base import StoreError

if TYPE_CHECKING:
    from comfyfleet.config import FleetSettings, PoolConfig
    from comfyfleet.fleet.providers import Provider
    from comfyfleet.fleet.reaper import Reaper
    from comfyfleet.fleet.registry import WorkerRegistry
    from comfyfleet.fleet.signals import FleetSignals, Spawn
    from comfyfleet.store.base import Store

logger = logging.getLogger(__name__)

LEADER_LOCK = "autoscaler"
_MIN_RECONCILE_GAP_S = 0.05

Demand = dict[str | None, tuple[int, int]]


class Reconciler:
    def __init__(
        self,
        *,
        registry: WorkerRegistry,
        signals: FleetSignals,
        store: Store,
        pools: Mapping[str, PoolConfig],
        providers: Mapping[str, Provider],
        trackers: Mapping[str, PoolTracker],
        reaper: Reaper,
        fleet: FleetSettings,
        replica_id: str,
        spawn: Spawn,
    ) -> None:
        self._registry = registry
        self._signals = signals
        self._store = store
        self._pools = pools
        self._providers = providers
        self._trackers = trackers
        self._reaper = reaper
        self._fleet = fleet
        self._replica_id = replica_id
        self._spawn = spawn
        self._policies = {name: ScalingPolicy.for_pool(pool, fleet) for name, pool in pools.items()}
        self._pool_by_label: dict[str, str] = {}
        for name, pool in pools.items():
            for label in pool.labels:
                self._pool_by_label.setdefault(label, name)
        self.default_pool = fleet.default_pool or next(
            (name for name, pool in pools.items() if pool.provider != "static"), None
        )
        self._rediscovered: set[str] = set()
        self._terminate_retry_at: dict[str, float] = {}  # back-off of failed terminations
        self._last_reap = 0.0
        self.passes = 0  # completed passes (leader or not), for tests and metrics
        self.ready = asyncio.Event()  # set after the first pass: leadership known, static workers recorded

    # -- the loop ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        last = -math.inf
        signals = self._signals
        while not signals.stop.is_set():
            await signals.wait(signals.reconcile, self._fleet.reconcile_interval_s)
            # Submissions wake this on every task; a burst needs one pass, not one per task.
            gap = _MIN_RECONCILE_GAP_S - (time.monotonic() - last)
            if gap > 0:
                await signals.wait(signals.timer, gap)
            if signals.stop.is_set():
                return
            last = time.monotonic()
            try:
                await self.reconcile_once()
            except StoreError as exc:
                logger.warning("fleet_reconcile_store_error error=%s", exc)
            self.passes += 1
            self.ready.set()

    async def reconcile_once(self) -> None:
        if not await self._hold_leadership():
            await self._registry.refresh_from_store()
            return
        for pool_name in self._pools:
            if pool_name not in self._rediscovered and await self._reaper.rediscover(pool_name):
                self._rediscovered.add(pool_name)
        self._finish_terminations()
        demand: Demand | None = None
        for pool_name, pool in self._pools.items():
            if pool.provider == "static":
                await self._reconcile_static(pool_name)
            else:
                if demand is None:
                    demand = await self._store.demand_by_pool()
                await self._reconcile_pool(pool_name, demand)
        if time.monotonic() - self._last_reap >= self._fleet.reap_interval_s:
            self._last_reap = time.monotonic()
            await self._reaper.reap()

    async def _hold_leadership(self) -> bool:
        leader = await self._store.try_leader(LEADER_LOCK)
        if leader != self._registry.is_leader:
            logger.info("fleet_leadership replica=%s leader=%s", self._replica_id, leader)
            self._registry.is_leader = leader
            self._rediscovered.clear()
            if leader:
                await self._registry.load_from_store()
        return leader

    def _finish_terminations(self) -> None:
        """Terminations asked for (by a follower, a remove during a start) or that failed and back off."""
        for worker in list(self._registry.workers.values()):
            if worker.id in self._registry.inflight:
                continue
            wanted_gone = worker.state is WorkerState.TERMINATING or (
                worker.info.get(TERMINATE_REQUESTED) and worker.state is not WorkerState.TERMINATED
            )
            if wanted_gone and self._terminate_retry_at.get(worker.id, 0.0) <= time.monotonic():
                self.spawn_terminate(worker, str(worker.info.get(TERMINATE_REQUESTED) or "retry"))

    async def _reconcile_static(self, pool_name: str) -> None:
        provider = self._providers[pool_name]
        for worker in self._registry.of_pool(pool_name):
            if worker.state is WorkerState.FAILED and worker.id not in self._registry.inflight:
                # A static server cannot be restarted by us: a fresh record probes it until it answers again.
                await self.terminate(worker, "failed")
        alive = [w for w in self._registry.of_pool(pool_name) if w.state is not WorkerState.TERMINATED]
        missing = len(await provider.list_ours()) - len(alive)
        for _ in range(max(missing, 0)):
            await self._start_worker(pool_name)

    async def _reconcile_pool(self, pool_name: str, demand: Demand) -> None:
        snapshot = self.snapshot(pool_name, demand)
        actions = decide(snapshot, self._policies[pool_name])
        tracker = self._trackers[pool_name]
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
        busy_in_store: set[str] | None = None
        seen = {view.id: view.state for view in snapshot.workers}
        for stop in [action for action in actions if isinstance(action, StopWorker)]:
            worker = self._registry.workers.get(stop.worker_id)
            if worker is None or worker.id in self._registry.inflight:
                continue
            if worker.state is not seen.get(worker.id):
                continue  # it changed while this pass awaited the store (taken a task, undrained): decide again
            if stop.reason not in ("failed",):
                # Never stop a worker that a dispatcher (in any replica) still has a task on.
                if busy_in_store is None:
                    running = await self._store.running_tasks()
                    busy_in_store = {task.worker_id for task in running if task.worker_id}
                if worker.id in busy_in_store:
                    continue
                tracker.last_scale_down_at = snapshot.now
            logger.info("pool_scale_down pool=%s worker_id=%s reason=%s", pool_name, worker.id, stop.reason)
            self.spawn_terminate(worker, stop.reason)

    # -- what decide sees -------------------------------------------------------------------------------------

    def pool_for_task(self, pool: str | None) -> str | None:
        """The pool whose demand a task with this ``pool`` field counts in (a pool name or one of its labels)."""
        if pool is None:
            return self.default_pool
        if pool in self._pools:
            return pool
        return self._pool_by_label.get(pool)

    def snapshot(self, pool_name: str, demand: Demand) -> PoolSnapshot:
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
            # A start in flight is capacity (pending/starting); a stop in flight is `terminating`, which is not.
            for w in self._registry.of_pool(pool_name)
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

    # -- starting and stopping workers ------------------------------------------------------------------------

    async def _start_worker(self, pool_name: str) -> None:
        registry = self._registry
        pool = self._pools[pool_name]
        now = utcnow()
        worker = Worker(
            id=new_worker_id(pool_name),
            pool=pool_name,
            provider=pool.provider,
            state=WorkerState.PENDING,
            created_at=now,
            updated_at=now,
        )
        registry.workers[worker.id] = worker
        registry.inflight.add(worker.id)
        try:
            # Recorded before the provider is asked, so a crash between the two is found again.
            await registry.write(worker)
            logger.info(
                "worker_creating worker_id=%s pool=%s provider=%s", worker.id, pool_name, pool.provider
            )
            try:
                handle = await self._providers[pool_name].create(worker.id)
            except Exception as exc:
                await self._create_failed(worker, exc)
                return
            worker.provider_id = handle.provider_id
            worker.endpoint = handle.endpoint
            worker.info.update(handle.info)
            registry.transition(worker, WorkerState.STARTING)
            await registry.write(worker)
            logger.info(
                "worker_starting worker_id=%s pool=%s provider_id=%s",
                worker.id,
                pool_name,
                handle.provider_id,
            )
        finally:
            registry.inflight.discard(worker.id)
        self._signals.probe_soon(worker.id)

    async def _create_failed(self, worker: Worker, exc: Exception) -> None:
        logger.warning("worker_create_failed worker_id=%s pool=%s error=%s", worker.id, worker.pool, exc)
        worker.error = f"create failed: {exc}"
        self._trackers[worker.pool].start_failed()
        self._registry.transition(worker, WorkerState.FAILED)
        self._registry.transition(worker, WorkerState.TERMINATED)
        await self._registry.write(worker)
        self._registry.workers.pop(worker.id, None)
        self._signals.reconcile.set()

    def spawn_terminate(self, worker: Worker, reason: str) -> None:
        """Terminate in the background. The worker counts as in flight from now on, so nothing (an undrain, a
        probe, another pass) acts on it between this decision and the task's start."""
        if worker.id in self._registry.inflight or worker.state is WorkerState.TERMINATED:
            return
        self._registry.inflight.add(worker.id)
        if self._spawn(self._terminate_claimed(worker, reason), worker.id) is None:
            self._registry.inflight.discard(worker.id)

    async def terminate(self, worker: Worker, reason: str) -> None:
        if worker.id in self._registry.inflight or worker.state is WorkerState.TERMINATED:
            return
        self._registry.inflight.add(worker.id)
        await self._terminate_claimed(worker, reason)

    async def _terminate_claimed(self, worker: Worker, reason: str) -> None:
        registry = self._registry
        try:
            if worker.state is not WorkerState.TERMINATING:
                registry.transition(worker, WorkerState.TERMINATING)
                worker.info["stop_reason"] = reason
                registry.verified.discard(worker.id)
                await registry.write(worker)
                self._signals.changed()
            logger.info("worker_terminating worker_id=%s pool=%s reason=%s", worker.id, worker.pool, reason)
            if not await self._provider_terminate(worker):
                return
            registry.transition(worker, WorkerState.TERMINATED)
            worker.current_task_ids = []
            await registry.write(worker)
            registry.forget(worker.id)
            self._terminate_retry_at.pop(worker.id, None)
            self._signals.changed()
            self._signals.reconcile.set()  # a replacement held back by max_workers may start now
            logger.info("worker_terminated worker_id=%s pool=%s", worker.id, worker.pool)
        finally:
            registry.inflight.discard(worker.id)

    async def _provider_terminate(self, worker: Worker) -> bool:
        provider = self._providers.get(worker.pool)
        if provider is None or worker.provider_id is None:
            return True
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
            return False
        return True
