"""The worker registry: this replica's view of the workers, and the dispatcher's :class:`WorkerDirectory`.

It holds every worker record in memory, decides which ones the dispatcher may use (``idle``/``busy``, probed by
this process, not suspected), carries out state changes (write-through to the store for lifecycle changes,
write-behind for the dispatcher's assignment and loaded-model notes) and keeps the view in step with the other
replicas through the store's ``workers`` notifications.

The leader (see :mod:`comfyfleet.fleet.reconciler`) owns the records. A follower only merges its assignment
fields into the stored record, and leaves its requests (drain, undrain, terminate) on the record for the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from comfyfleet.domain import Worker, WorkerState, can_transition_worker
from comfyfleet.fleet.errors import UnknownWorker, WorkerStateConflict
from comfyfleet.fleet.pools import utcnow
from comfyfleet.store.base import NotFound, StoreError

if TYPE_CHECKING:
    from comfyfleet.config import PoolConfig
    from comfyfleet.fleet.signals import FleetSignals
    from comfyfleet.store.base import Store

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "workers"
MAX_LOADED_MODELS = 64
# Assignment changes are written at most this often: a busy worker's record is written a few times a
# second, not twice per task (and followers re-read the records after each write).
FLUSH_SPACING_S = 0.2
LIVE = (WorkerState.IDLE, WorkerState.BUSY)
# Requests a follower leaves on a record for the leader; a request replaces the one that undoes it.
DRAIN_REQUESTED = "drain_requested"
UNDRAIN_REQUESTED = "undrain_requested"
TERMINATE_REQUESTED = "terminate_requested"
_OPPOSITE = {DRAIN_REQUESTED: UNDRAIN_REQUESTED, UNDRAIN_REQUESTED: DRAIN_REQUESTED}


class WorkerRegistry:
    """Implements :class:`comfyfleet.fleet.base.WorkerDirectory`; see the module docstring."""

    def __init__(
        self, pools: Mapping[str, PoolConfig], store: Store, signals: FleetSignals, replica_id: str
    ) -> None:
        self._pools = pools
        self._store = store
        self._signals = signals
        self._replica_id = replica_id
        self.workers: dict[str, Worker] = {}
        self.verified: set[str] = set()  # answered a probe in this process: may be handed to the dispatcher
        self.suspect: set[str] = (
            set()
        )  # the dispatcher could not reach it; not handed out until a probe passes
        self.inflight: set[str] = set()  # a start or stop is running (or about to run) for it
        self.is_leader = False  # set by the reconciler, which owns leadership
        self._dirty: set[str] = set()
        self._write_lock = asyncio.Lock()

    # -- WorkerDirectory --------------------------------------------------------------------------------------

    def usable_workers(self) -> Sequence[Worker]:
        """Workers ``idle``/``busy``, probed by this process, not suspected. The objects are the registry's
        own: read them, do not change them."""
        return [
            worker
            for worker in self.workers.values()
            if worker.state in LIVE
            and worker.endpoint
            and worker.id in self.verified
            and worker.id not in self.suspect
            and worker.pool in self._pools
        ]

    def prefetch(self, worker: Worker) -> int:
        pool = self._pools.get(worker.pool)
        return pool.prefetch if pool is not None else 0

    async def wait_changed(self) -> None:
        await self._signals.wait_changed()

    async def set_assignments(self, worker_id: str, task_ids: Sequence[str]) -> None:
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        given = len(set(task_ids) - set(worker.current_task_ids))
        if given:
            worker.info["tasks_given"] = int(worker.info.get("tasks_given", 0)) + given
        worker.current_task_ids = list(task_ids)
        worker.last_active_at = utcnow()
        if worker.state in LIVE:
            target = WorkerState.BUSY if task_ids else WorkerState.IDLE
            if target is not worker.state:
                worker.state = target
        worker.updated_at = utcnow()
        self.mark_dirty(worker)
        pool = self._pools.get(worker.pool)
        if (
            given
            and pool is not None
            and pool.provider != "static"
            and 0 < pool.recycle_after_tasks <= worker.info["tasks_given"]
            and worker.state in LIVE
        ):
            # It finishes what it holds, takes nothing new, and the autoscaler starts a fresh one if needed.
            worker.info["recycled_after_tasks"] = worker.info["tasks_given"]
            logger.info("worker_recycle worker_id=%s tasks=%s", worker.id, worker.info["tasks_given"])
            await self.drain(worker)

    async def note_loaded_models(self, worker_id: str, models: Sequence[str]) -> None:
        worker = self.workers.get(worker_id)
        if worker is None or not models:
            return
        recent = [name for name in worker.loaded_models if name not in models] + list(models)
        recent = recent[-MAX_LOADED_MODELS:]
        if recent != worker.loaded_models:
            worker.loaded_models = recent
            self.mark_dirty(worker)

    async def report_unreachable(self, worker_id: str, reason: str) -> None:
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        logger.warning("worker_reported_unreachable worker_id=%s reason=%s", worker_id, reason)
        if worker.id not in self.suspect:
            self.suspect.add(worker.id)
            self._signals.changed()
        self._signals.probe_soon(worker.id)
        if not self.is_leader:
            await self.notify(f"probe:{worker_id}")

    async def recycle(self, worker_id: str, reason: str) -> None:
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        logger.warning("worker_recycle worker_id=%s reason=%s", worker_id, reason)
        if self.is_leader:
            await self.fail(worker, f"recycled: {reason}")
        else:
            await self.request_from_leader(worker, TERMINATE_REQUESTED, reason)

    # -- reading ----------------------------------------------------------------------------------------------

    def of_pool(self, pool: str | None = None) -> list[Worker]:
        return [worker for worker in self.workers.values() if pool is None or worker.pool == pool]

    def get(self, worker_id: str) -> Worker:
        worker = self.workers.get(worker_id)
        if worker is None:
            raise UnknownWorker(f"no worker {worker_id!r}")
        return worker

    async def fresh(self, worker_id: str) -> Worker:
        """The worker as this replica knows it, else as the store has it (another replica's new record)."""
        worker = self.workers.get(worker_id)
        if worker is not None:
            return worker
        try:
            return await self._store.get_worker(worker_id)
        except NotFound:
            raise UnknownWorker(f"no worker {worker_id!r}") from None

    # -- state changes ----------------------------------------------------------------------------------------

    def transition(self, worker: Worker, target: WorkerState) -> bool:
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

    def mark_failed(self, worker: Worker, reason: str) -> bool:
        """Fail the worker in memory (the caller writes it): True when it was not failed or stopping yet."""
        if worker.state in (WorkerState.FAILED, WorkerState.TERMINATING, WorkerState.TERMINATED):
            return False
        worker.error = reason
        if not self.transition(worker, WorkerState.FAILED):
            return False
        self.verified.discard(worker.id)
        logger.warning("worker_failed worker_id=%s pool=%s reason=%s", worker.id, worker.pool, reason)
        # Signalled before the write: the worker left usable_workers() the moment its state changed.
        self._signals.changed()
        self._signals.reconcile.set()
        return True

    async def fail(self, worker: Worker, reason: str) -> None:
        if self.mark_failed(worker, reason):
            await self.write(worker)

    async def drain(self, worker: Worker) -> None:
        """An ``idle``/``busy`` worker takes no new task (the reconciler stops it once it holds none)."""
        if not self.is_leader:
            await self.request_from_leader(worker, DRAIN_REQUESTED, "drain requested")
            return
        worker.info.pop(DRAIN_REQUESTED, None)
        if not self.transition(worker, WorkerState.DRAINING):
            return
        await self.write(worker)
        self._signals.changed()
        self._signals.reconcile.set()
        logger.info("worker_draining worker_id=%s", worker.id)

    async def undrain(self, worker: Worker) -> None:
        """A ``draining`` worker goes back to ``idle``/``busy``; it is handed tasks again once it is healthy: at
        once if its last probe passed, else when the probe made now passes. Raises
        :class:`WorkerStateConflict` when its stop has already begun."""
        if not self.is_leader:
            await self.request_from_leader(worker, UNDRAIN_REQUESTED, "undrain requested")
            return
        worker.info.pop(UNDRAIN_REQUESTED, None)
        if worker.state is not WorkerState.DRAINING:
            return
        if worker.id in self.inflight or worker.info.get(TERMINATE_REQUESTED):
            raise WorkerStateConflict(f"worker {worker.id!r} is already being terminated")
        if worker.info.pop("recycled_after_tasks", None) is not None:
            worker.info["tasks_given"] = 0  # recycled by count: the count starts again, or it drains at once
        if worker.health_failures or worker.id in self.suspect:
            self.verified.discard(worker.id)  # back in use only once a probe passes
        self.transition(worker, WorkerState.BUSY if worker.current_task_ids else WorkerState.IDLE)
        await self.write(worker)
        self._signals.changed()
        self._signals.probe_soon(worker.id)
        logger.info("worker_undrained worker_id=%s state=%s", worker.id, worker.state)

    def forget(self, worker_id: str) -> None:
        """The worker is terminated: drop everything this replica remembers about it."""
        self.workers.pop(worker_id, None)
        self.suspect.discard(worker_id)
        self.verified.discard(worker_id)
        self._signals.forget(worker_id)

    # -- the store --------------------------------------------------------------------------------------------

    async def load_from_store(self) -> None:
        workers = await self._store.list_workers()
        self.workers = {worker.id: worker for worker in workers if worker.state is not WorkerState.TERMINATED}
        for worker in self.workers.values():
            if worker.pool not in self._pools:
                logger.warning("worker_pool_unknown worker_id=%s pool=%s", worker.id, worker.pool)

    async def write(self, worker: Worker) -> None:
        """Write-through: the record as it is now in memory."""
        self._dirty.discard(worker.id)
        async with self._write_lock:
            await self._store.upsert_worker(dataclasses.replace(worker))
        await self.notify(worker.id)

    def mark_dirty(self, worker: Worker) -> None:
        self._dirty.add(worker.id)
        self._signals.flush.set()

    async def flush(self) -> None:
        """Write the batched assignment / loaded-model changes. The leader owns the records; a follower
        only merges its assignment fields into the stored record, so a stale copy of its own can never undo
        the leader's lifecycle changes (or bring a terminated worker back)."""
        written: list[str] = []
        while self._dirty:
            worker_id = self._dirty.pop()
            worker = self.workers.get(worker_id)
            if worker is None:
                continue
            try:
                async with self._write_lock:
                    # Only the activity columns: the record's node catalogue (hundreds of node types) is
                    # neither encoded nor rewritten for every task.
                    if self.is_leader:
                        if not await self._store.update_worker_activity(worker, owner=True):
                            await self._store.upsert_worker(dataclasses.replace(worker))
                    elif not await self._store.update_worker_activity(worker, owner=False):
                        continue
                written.append(worker_id)
            except StoreError:
                self._dirty.add(worker_id)
                raise
        if written and self.is_leader:
            await self.notify("")  # followers re-read the records
        for worker_id in [] if self.is_leader else written:
            await self.notify(worker_id)  # the leader merges this worker's assignments

    async def flush_loop(self) -> None:
        while not self._signals.stop.is_set():
            await self._signals.wait(self._signals.flush, 1.0)
            try:
                await self.flush()
            except StoreError as exc:
                logger.warning("fleet_flush_failed error=%s", exc)
            if not self._signals.stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FLUSH_SPACING_S):
                        await self._signals.stop.wait()

    async def notify(self, payload: str) -> None:
        try:
            await self._store.notify(NOTIFY_CHANNEL, f"{self._replica_id}:{payload}")
        except StoreError as exc:
            logger.warning("fleet_notify_failed error=%s", exc)

    async def request_from_leader(self, worker: Worker, flag: str, reason: str) -> None:
        """From a non-leader replica: leave the request on the record for the leader to carry out."""
        record = await self._store.get_worker(worker.id)
        record.info[flag] = reason
        if flag in _OPPOSITE:
            record.info.pop(_OPPOSITE[flag], None)
        await self._store.upsert_worker(record)
        await self.notify(worker.id)

    async def store_knows_live(self, worker_id: str) -> bool:
        """The store has a record of this worker that is not terminated (another replica's, maybe unread)."""
        try:
            record = await self._store.get_worker(worker_id)
        except NotFound:
            return False
        if record.state is WorkerState.TERMINATED:
            return False
        self.workers.setdefault(record.id, record)
        return True

    # -- the other replicas -----------------------------------------------------------------------------------

    async def listen_loop(self) -> None:
        async for note in self._store.listen():
            if note.channel in ("tasks", "task") or note.channel.startswith("tasks"):
                self._signals.reconcile.set()
                continue
            if note.channel != NOTIFY_CHANNEL:
                continue
            sender, _, payload = note.payload.partition(":")
            if sender == self._replica_id:
                continue
            if payload.startswith("probe:"):
                self._signals.probe_soon(payload.removeprefix("probe:"))
            elif payload:
                await self.merge_from_store(payload)
            elif not self.is_leader:
                await self.refresh_from_store()

    async def merge_from_store(self, worker_id: str) -> None:
        try:
            record = await self._store.get_worker(worker_id)
        except NotFound:
            self.workers.pop(worker_id, None)
            self._signals.changed()
            return
        except StoreError as exc:
            logger.warning("fleet_refresh_failed error=%s", exc)
            return
        if not self.is_leader:
            self._adopt_record(record)
            return
        # The leader owns lifecycle fields; another replica only reports assignments and requests.
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        worker.current_task_ids = record.current_task_ids
        worker.last_active_at = record.last_active_at or worker.last_active_at
        worker.loaded_models = record.loaded_models or worker.loaded_models
        if worker.state in LIVE:
            worker.state = WorkerState.BUSY if worker.current_task_ids else WorkerState.IDLE
        await self._carry_out_requests(worker, record.info)

    async def _carry_out_requests(self, worker: Worker, requests: Mapping[str, object]) -> None:
        if requests.get(TERMINATE_REQUESTED) and worker.state is not WorkerState.TERMINATING:
            worker.info[TERMINATE_REQUESTED] = requests[TERMINATE_REQUESTED]
            self._signals.reconcile.set()
        if requests.get(DRAIN_REQUESTED) and worker.state in LIVE:
            await self.drain(worker)
        elif requests.get(UNDRAIN_REQUESTED) and worker.state is WorkerState.DRAINING:
            try:
                await self.undrain(worker)
            except WorkerStateConflict as exc:
                logger.warning("worker_undrain_refused worker_id=%s reason=%s", worker.id, exc)

    def _adopt_record(self, record: Worker) -> None:
        before = self.workers.get(record.id)
        if record.state is WorkerState.TERMINATED:
            self.workers.pop(record.id, None)
        else:
            self.workers[record.id] = record
            if record.state in LIVE and record.health_failures == 0:
                self.verified.add(record.id)  # the leader probed it
        if before is None or before.state != record.state or before.endpoint != record.endpoint:
            self._signals.changed()

    async def refresh_from_store(self) -> None:
        try:
            records = await self._store.list_workers()
        except StoreError as exc:
            logger.warning("fleet_refresh_failed error=%s", exc)
            return
        seen = set()
        for record in records:
            seen.add(record.id)
            self._adopt_record(record)
        for worker_id in [worker_id for worker_id in self.workers if worker_id not in seen]:
            self.workers.pop(worker_id)
            self._signals.changed()
