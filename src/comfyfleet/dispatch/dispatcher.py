"""The task dispatcher: its loops, the worker slots, claiming and placement, and the adoption of orphans.

Event-driven: a submitted task, a freed slot, a worker that became ready, a cancel request or a retry coming
due wakes the loop at once; a slow safety poll only covers timers. Each claimed task runs as one
:class:`~comfyfleet.dispatch.attempt.Attempt` (submit, follow, collect, end) in the dispatcher's task group.

Crash safety: the claim writes each task's worker and ``prompt_id`` (chosen here) with its lease, before the
prompt is sent. Leases are renewed only for attempts held in memory: a replica that dies (or loses track of a
claim while its store was away) leaves leases that expire, and whoever adopts the attempt asks the worker about
that ``prompt_id`` and collects, follows or retries it, never runs it twice. Every loop outlives a store outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import zlib
from collections.abc import Callable, Sequence

import httpx

from comfyfleet.comfy.client import ComfyClient
from comfyfleet.comfy.errors import ComfyError
from comfyfleet.comfy.workflow import model_names, node_types
from comfyfleet.config import DispatchSettings, PoolConfig
from comfyfleet.dispatch import models as task_models
from comfyfleet.dispatch import placement
from comfyfleet.dispatch.attempt import Attempt, WorkerSlot
from comfyfleet.dispatch.clock import Clock, SystemClock
from comfyfleet.dispatch.due import NextDue
from comfyfleet.dispatch.record import AttemptContext, AttemptRecord
from comfyfleet.domain import Task, WorkerState
from comfyfleet.events import CANCEL_CHANNEL, EVENTS_CHANNEL, TASKS_CHANNEL, EventBus
from comfyfleet.fleet.base import WorkerDirectory
from comfyfleet.models.service import ModelService
from comfyfleet.outputs import OutputStore
from comfyfleet.store import NotFound, StaleLease, Store, StoreError

logger = logging.getLogger(__name__)

ClientFactory = Callable[[str], ComfyClient]

# After a round that the store failed, the next one comes sooner than the safety poll: the queue goes on
# within seconds of the store's return.
_STORE_RETRY_MIN_S = 0.1
_STORE_RETRY_MAX_S = 2.0


class Dispatcher:
    """Async context manager; ``run()`` holds its loops until ``stop()`` or cancellation.

    ``clock`` (monotonic and wall time) and ``client_factory`` are seams for tests; ``directory`` is the
    fleet as the dispatcher sees it (:class:`~comfyfleet.fleet.base.WorkerDirectory`)."""

    def __init__(
        self,
        store: Store,
        directory: WorkerDirectory,
        outputs: OutputStore,
        settings: DispatchSettings,
        *,
        owner: str,
        bus: EventBus | None = None,
        pools: Sequence[PoolConfig] = (),
        limits_max_input_bytes: int = 50 * 1024 * 1024,
        client_factory: ClientFactory | None = None,
        clock: Clock | None = None,
        models: ModelService | None = None,
    ) -> None:
        self.store = store
        self._models = task_models.TaskModels.of(models, pools)
        self.directory = directory
        self.outputs = outputs
        self.settings = settings
        self.owner = owner
        self.bus = bus or EventBus()
        self.clock = clock or SystemClock()
        self._due = NextDue(store, self.clock, settings.safety_poll_s)
        self._pool_labels = {pool.name: tuple(pool.labels) for pool in pools}
        self._max_input_bytes = limits_max_input_bytes
        self._client_factory = client_factory or ComfyClient
        self._slots: dict[str, WorkerSlot] = {}
        self._attempts: dict[str, Attempt] = {}
        self._skips: dict[str, int] = {}
        self._facts: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        # Adopted running attempts whose worker is not usable (yet), with when to stop waiting for it.
        self._orphans: dict[str, tuple[Task, float]] = {}
        self._orphans_lock = asyncio.Lock()
        self._orphan_wait_s = max(30.0, 4 * settings.lease_s)
        # A claim failed without an answer (it may have been committed), or a claimed task could not be given
        # back: tasks may be running in our name that no attempt holds. The next round looks for them.
        self._lost_claims = False
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._ctx: AttemptContext | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Dispatcher:
        self._ctx = AttemptContext(
            store=self.store,
            directory=self.directory,
            outputs=self.outputs,
            settings=self.settings,
            bus=self.bus,
            clock=self.clock,
            http=httpx.AsyncClient(timeout=30.0),
            max_input_bytes=self._max_input_bytes,
            models=self._models,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stopping.set()
        for slot in list(self._slots.values()):
            await self._close_slot(slot)
        if self._ctx is not None:
            await self._ctx.http.aclose()
            self._ctx = None

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Run every loop of the dispatcher until :meth:`stop`; a loop that dies stops them all."""
        if self._ctx is None:
            raise RuntimeError("Dispatcher.run() before 'async with Dispatcher(...)'")
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                await self._sync_workers()
                await self._adopt(previous_owner=self.owner)
                group.create_task(self._dispatch_loop(), name="dispatch-loop")
                group.create_task(self._notification_loop(), name="dispatch-notifications")
                group.create_task(self._worker_watch_loop(), name="dispatch-worker-watch")
                group.create_task(self._lease_loop(), name="dispatch-leases")
                await self._stopping.wait()
                raise _Stop
        except* _Stop:
            pass
        finally:
            self._group = None

    def latest_preview(self, task_id: str) -> tuple[bytes, str, int] | None:
        """The newest preview image of a task this replica runs: bytes, content type, sequence number."""
        attempt = self._attempts.get(task_id)
        if attempt is None or attempt.preview is None:
            return None
        return (*attempt.preview, attempt.previews)

    # -- loops ----------------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        store_failures = 0
        while not self._stopping.is_set():
            timeout = self.settings.safety_poll_s
            if store_failures:
                timeout = min(timeout, _STORE_RETRY_MIN_S * 2 ** min(store_failures, 8), _STORE_RETRY_MAX_S)
            timeout = await self._due.limit(timeout)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # not wait_for: that starts a task per wake-up
                    await self._wake.wait()
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                await self._sync_workers()
                if self._lost_claims:
                    await self._find_lost_claims()
                if self._orphans:
                    await self._attach_orphans()
                while await self._dispatch_round():
                    pass
                store_failures = 0
            except StoreError:
                store_failures += 1
                logger.warning("dispatch_round_failed", exc_info=store_failures == 1)

    async def _notification_loop(self) -> None:
        async for note in self.store.listen():
            if note.channel == TASKS_CHANNEL:
                self._due.heard(note.payload)
                self._wake.set()
            elif note.channel == CANCEL_CHANNEL:
                attempt = self._attempts.get(note.payload)
                if attempt is not None:
                    attempt.request_cancel()
            elif note.channel == EVENTS_CHANNEL:
                self.bus.receive_relayed(note.payload)

    async def _worker_watch_loop(self) -> None:
        while not self._stopping.is_set():
            await self.directory.wait_changed()
            self._wake.set()

    async def _lease_loop(self) -> None:
        interval = self.settings.lease_s / 3
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)
            if self._stopping.is_set():
                return
            try:
                # Only what this dispatcher holds: a row it lost track of expires and is adopted below.
                held = set(self._attempts) | set(self._orphans)
                await self.store.renew_leases(self.owner, self.settings.lease_s, held)
                await self._adopt()
                await self._check_cancels()
            except StoreError:
                logger.warning("lease_loop_failed", exc_info=True)

    async def _check_cancels(self) -> None:
        """Safety net for a lost cancel notification: look at the store's flag."""
        for attempt in list(self._attempts.values()):
            if attempt.cancel.is_set():
                continue
            with contextlib.suppress(NotFound):
                task = await self.store.get_task(attempt.task.id)
                if task.cancel_requested:
                    attempt.request_cancel()

    # -- workers --------------------------------------------------------------------------------
    async def _sync_workers(self) -> None:
        usable = {worker.id: worker for worker in self.directory.usable_workers() if worker.endpoint}
        for worker_id, slot in list(self._slots.items()):
            current = usable.get(worker_id)
            if current is not None and current.endpoint == slot.worker.endpoint:
                slot.worker, slot.retiring = current, False
            elif current is None and slot.attempts and not await self._worker_gone(worker_id):
                # Withdrawn but not gone (a failed probe, drained): its prompts may well finish, and
                # running them again elsewhere would run them twice. Follow them; place nothing new.
                slot.retiring = True
            else:
                await self._close_slot(slot)
        for worker_id, worker in usable.items():
            if worker_id in self._slots:
                continue
            assert worker.endpoint is not None
            client = self._client_factory(worker.endpoint)
            try:
                await client.__aenter__()
            except ComfyError:
                logger.warning("worker_client_open_failed worker_id=%s", worker_id, exc_info=True)
                await self.directory.report_unreachable(worker_id, "could not open a connection")
                continue
            self._slots[worker_id] = WorkerSlot(
                worker=worker, client=client, recent_models=list(worker.loaded_models)
            )
            logger.info("worker_attached worker_id=%s endpoint=%s", worker_id, worker.endpoint)

    async def _close_slot(self, slot: WorkerSlot) -> None:
        self._slots.pop(slot.worker.id, None)
        for attempt in list(slot.attempts.values()):
            attempt.stop("worker_gone")  # the worker went away: its attempts cannot finish there
        with contextlib.suppress(Exception):
            await slot.client.__aexit__(None, None, None)
        logger.info("worker_detached worker_id=%s", slot.worker.id)

    def _placement_slots(self) -> list[placement.Slot]:
        slots = []
        for slot in self._slots.values():
            if slot.retiring:
                continue
            capacity = 1 + max(0, self.directory.prefetch(slot.worker))
            slots.append(
                placement.Slot(
                    worker_id=slot.worker.id,
                    pools=placement.pools_of(slot.worker.pool, self._pool_labels),
                    free=max(0, capacity - len(slot.attempts)),
                    # Other replicas' prompts on this worker count too (as the fleet last heard of them).
                    assigned=max(len(slot.attempts), len(slot.worker.current_task_ids)),
                    node_types=frozenset(slot.worker.node_types)
                    if slot.worker.node_types is not None
                    else None,
                    recent_models=tuple(slot.recent_models),
                    tie_break=zlib.crc32(f"{self.owner}/{slot.worker.id}".encode()),
                )
            )
        return slots

    # -- claiming and placement -----------------------------------------------------------------
    async def _dispatch_round(self) -> bool:
        """Place as many pending tasks as there are free slots. True when another round may place more."""
        if self._stopping.is_set() or self._group is None:
            return False
        slots = self._placement_slots()
        free_total = sum(slot.free for slot in slots)
        if free_total == 0:
            return False
        window = await self._window(slots, free_total)
        if not window:
            return False
        task_models.note_model_files(self._models, window, slots, self._slots)
        hopeless = [task for task in window if placement.unplaceable(task, slots)]
        if hopeless:
            await self._fail_unplaceable(hopeless)
            return True
        assignments = placement.plan(window, slots, model_aware=self.settings.placement)
        if not assignments:
            return False
        chosen = {task_id for task_id, _ in assignments}
        for task_id in placement.skipped_ids(window, chosen):
            self._skips[task_id] = self._skips.get(task_id, 0) + 1
        # The dispatch record (worker, prompt id) rides on the claim: one write, not two.
        assigned = {task_id: (worker_id, str(uuid.uuid4())) for task_id, worker_id in assignments}
        claimed = await self._claim(list(assigned), assigned)
        for task in claimed:
            self._skips.pop(task.id, None)
            self._facts.pop(task.id, None)
            target = self._slots.get(assigned[task.id][0])
            if target is None:  # the worker left while we claimed
                await self._release(task)
                continue
            self._start_attempt(target, task)
        return len(claimed) < len(assignments) or len(claimed) == free_total

    async def _window(self, slots: list[placement.Slot], free_total: int) -> list[placement.PendingTask]:
        """The head of the queue that placement chooses from, for the pools of the free slots."""
        pools: set[str | None] = {None}
        for slot in slots:
            if slot.free > 0:
                pools |= slot.pools
        window_size = max(32, 4 * free_total)
        if self.settings.fair_share:
            # Every tenant's queue head, not only the overall head: a long backlog cannot hide another's task.
            heads = await self.store.peek_pending_per_tenant(limit=window_size, pools=pools)
            window_tasks = placement.fair_share(heads, await self.store.running_per_tenant()) if heads else []
        else:
            window_tasks = await self.store.peek_pending(limit=window_size, pools=pools)
        in_window = {task.id for task in window_tasks}
        for cache in (self._skips, self._facts):
            for task_id in [key for key in cache if key not in in_window]:
                del cache[task_id]
        return [self._pending_view(task) for task in window_tasks]

    async def _claim(
        self, task_ids: list[str], assigned: dict[str, tuple[str, str]] | None = None
    ) -> list[Task]:
        try:
            return await self.store.claim_ids(self.owner, self.settings.lease_s, task_ids, assigned)
        except StoreError:
            self._lost_claims = True
            raise

    def _pending_view(self, task: Task) -> placement.PendingTask:
        # The graph's node types and model names are read once per task while it waits.
        facts = self._facts.get(task.id)
        if facts is None:
            facts = self._facts[task.id] = (
                frozenset(node_types(task.payload)),
                frozenset(model_names(task.payload)),
            )
        return placement.PendingTask(
            id=task.id,
            priority=task.priority,
            pool=task.pool,
            node_types=facts[0],
            models=facts[1],
            skips=self._skips.get(task.id, 0),
            files=task_models.files_of(task),
        )

    async def _fail_unplaceable(self, hopeless: list[placement.PendingTask]) -> None:
        claimed = await self._claim([task.id for task in hopeless])
        known = set().union(*(set(slot.worker.node_types or ()) for slot in self._slots.values()))
        for task in claimed:
            view = next(item for item in hopeless if item.id == task.id)
            missing = sorted(view.node_types - known)
            named = ", ".join(missing) or "(each is on some worker, but none of its pool has them all)"
            with contextlib.suppress(StaleLease):
                await self._fail_missing(
                    task, f"no worker has the node types this workflow uses: {named}", missing
                )

    async def _fail_missing(self, task: Task, message: str, missing: list[str]) -> None:
        record = self._record(task)
        details = {"missing_node_types": missing}
        failed = await record.end(
            "fail", lambda lease: self.store.fail_task(lease, message, "missing_node_type", details)
        )
        await record.publish(failed)

    def _record(self, task: Task) -> AttemptRecord:
        """The store's side of an attempt this dispatcher ends without running it; one try per write (its
        loops try again)."""
        assert self._ctx is not None
        return AttemptRecord(self._ctx, task, self.owner, patient=False)

    async def _release(self, task: Task) -> None:
        try:
            with contextlib.suppress(StaleLease):
                await asyncio.shield(self._record(task).release())
        except StoreError:
            self._lost_claims = True
            raise
        finally:
            self._wake.set()

    def _start_attempt(self, slot: WorkerSlot, task: Task, *, adopted: bool = False) -> None:
        assert self._group is not None
        assert self._ctx is not None
        attempt = Attempt(self._ctx, slot, task, self.owner)
        slot.attempts[task.id] = attempt
        self._attempts[task.id] = attempt
        self._group.create_task(self._run_attempt(slot, attempt, adopted=adopted), name=f"attempt-{task.id}")

    async def _run_attempt(self, slot: WorkerSlot, attempt: Attempt, *, adopted: bool) -> None:
        task_id = attempt.task.id
        with contextlib.suppress(Exception):
            await self.directory.set_assignments(slot.worker.id, list(slot.attempts))
        try:
            await attempt.run(adopted=adopted)
        finally:
            slot.attempts.pop(task_id, None)
            if self._attempts.get(task_id) is attempt:
                del self._attempts[task_id]
            if slot.retiring and not slot.attempts:
                await self._close_slot(slot)
            if not self._stopping.is_set():
                with contextlib.suppress(Exception):
                    await self.directory.set_assignments(slot.worker.id, list(slot.attempts))
            self._wake.set()

    # -- recovery -------------------------------------------------------------------------------
    async def _adopt(self, previous_owner: str | None = None) -> None:
        adopted = await self.store.adopt_expired(
            self.owner, self.settings.lease_s, previous_owner=previous_owner
        )
        deadline = self.clock.monotonic() + self._orphan_wait_s
        for task in adopted:
            attempt = self._attempts.get(task.id)
            if attempt is not None:
                # Still running here: its lease ran out while the store was away. It goes on under the
                # new lease rather than being fenced out by its own dispatcher.
                attempt.record.adopt(task)
            else:
                self._orphans[task.id] = (task, deadline)
        await self._attach_orphans()

    async def _find_lost_claims(self) -> None:
        """Tasks running in our name that no attempt holds (a claim committed whose answer was lost, a
        release that failed): the orphan path gives those that never reached a worker back to the queue."""
        deadline = self.clock.monotonic()
        async with self._orphans_lock:
            for task in await self.store.running_tasks(self.owner):
                if task.id not in self._attempts and task.id not in self._orphans:
                    logger.info("claim_recovered task_id=%s attempt=%s", task.id, task.attempt)
                    self._orphans[task.id] = (task, deadline)
            self._lost_claims = False

    async def _attach_orphans(self) -> None:
        """Re-attach adopted attempts to their workers. A worker may not be usable yet (after a restart the
        fleet probes it first): its attempt waits for it rather than running the prompt a second time
        elsewhere. Only a worker that is gone, or one that stays away too long, sends the task back."""
        # The dispatch loop and the lease loop both come here: one at a time, or a task starts twice.
        async with self._orphans_lock:
            for task_id in list(self._orphans):
                task, deadline = self._orphans[task_id]
                if task_id in self._attempts:
                    del self._orphans[task_id]
                    continue
                slot = self._slots.get(task.worker_id or "")
                if slot is not None and task.prompt_id:
                    del self._orphans[task_id]
                    logger.info(
                        "attempt_adopted task_id=%s worker_id=%s prompt_id=%s",
                        task.id,
                        task.worker_id,
                        task.prompt_id,
                    )
                    self._start_attempt(slot, task, adopted=True)
                    continue
                waiting = task.prompt_id and task.worker_id and self.clock.monotonic() < deadline
                if waiting and not await self._worker_gone(task.worker_id or ""):
                    continue
                with contextlib.suppress(StaleLease):
                    if not task.prompt_id:
                        await self._release(task)  # never reached a worker
                    else:
                        await self._record(task).retry_or_fail(
                            "worker_lost", f"its worker {task.worker_id} is no longer available"
                        )
                # Only once the store took it: a write that failed is tried again next time.
                del self._orphans[task_id]

    async def _worker_gone(self, worker_id: str) -> bool:
        try:
            worker = await self.store.get_worker(worker_id)
        except NotFound:
            return True
        return worker.state in {WorkerState.FAILED, WorkerState.TERMINATED, WorkerState.TERMINATING}


class _Stop(Exception):
    """Raised inside the TaskGroup to end :meth:`Dispatcher.run` cleanly."""
