"""The task dispatcher: claim, place, submit, follow, collect, retry, time out, cancel, recover.

Event-driven: a submitted task, a freed slot, a worker that became ready, a cancel request or a retry
coming due wakes the loop at once; a slow safety poll only covers timers. Completion is read from each
worker's one WebSocket (through :meth:`ComfyClient.follow`), with polling only as its fallback.

Crash safety: before a prompt is submitted, its worker and ``prompt_id`` (chosen here) are written to the
store under the attempt's lease. A replica that dies leaves leases that expire; whoever adopts the attempt
asks the worker about that ``prompt_id`` and collects it, follows it, or retries it — never runs it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mimetypes
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import stamina

from comfyfleet import metrics
from comfyfleet.comfy.client import ComfyClient, PromptOutcome
from comfyfleet.comfy.errors import ComfyError, PromptLost, WorkflowRejected
from comfyfleet.comfy.events import ComfyEvent
from comfyfleet.comfy.workflow import model_names, node_types
from comfyfleet.config import DispatchSettings, PoolConfig
from comfyfleet.dispatch import placement
from comfyfleet.dispatch.inputs import InputError, prepare_inputs
from comfyfleet.dispatch.retry import (
    classify_execution_error,
    next_attempt_at,
    sanitize_execution_error,
)
from comfyfleet.domain import Task, TaskPhase, TaskStatus, Worker, WorkerState
from comfyfleet.events import CANCEL_CHANNEL, EVENTS_CHANNEL, TASKS_CHANNEL, EventBus, TaskEvent
from comfyfleet.fleet.base import WorkerDirectory
from comfyfleet.outputs import OutputsError, OutputStore
from comfyfleet.outputs.base import OutputsUnavailable
from comfyfleet.store import Lease, NotFound, StaleLease, Store, StoreError

logger = logging.getLogger(__name__)

_PROGRESS_WRITE_INTERVAL_S = 0.5


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class _Attempt:
    task: Task
    lease: Lease
    worker_id: str
    prompt_id: str | None = None
    submitted: bool = False
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: str | None = None  # "cancelled" | "timeout" once we asked the worker to stop
    started_monotonic: float = field(default_factory=time.monotonic)
    execution_started_at: datetime | None = None
    accepted_at: datetime | None = None  # when the worker accepted the prompt
    last_progress_write: float = 0.0
    progress: dict[str, Any] = field(default_factory=dict)
    progress_written: dict[str, Any] | None = None
    preview: tuple[bytes, str] | None = None  # the latest preview image and its content type
    previews: int = 0


@dataclass(slots=True)
class _WorkerSlot:
    worker: Worker
    client: ComfyClient
    attempts: dict[str, _Attempt] = field(default_factory=dict)
    recent_models: list[str] = field(default_factory=list)
    retiring: bool = False  # no longer offered by the fleet: gets no new prompts, finishes what it has


ClientFactory = Callable[[str], ComfyClient]


class Dispatcher:
    """Async context manager; ``run()`` holds its loops until ``stop()`` or cancellation."""

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
    ) -> None:
        self.store = store
        self.directory = directory
        self.outputs = outputs
        self.settings = settings
        self.owner = owner
        self.bus = bus or EventBus()
        self._pool_labels = {pool.name: tuple(pool.labels) for pool in pools}
        self._max_input_bytes = limits_max_input_bytes
        self._client_factory = client_factory or ComfyClient
        self._slots: dict[str, _WorkerSlot] = {}
        self._attempts: dict[str, _Attempt] = {}
        self._skips: dict[str, int] = {}
        self._facts: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        # Adopted running attempts whose worker is not usable (yet), with when to stop waiting for it.
        self._orphans: dict[str, tuple[Task, float]] = {}
        self._orphans_lock = asyncio.Lock()
        self._orphan_wait_s = max(30.0, 4 * settings.lease_s)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._http: httpx.AsyncClient | None = None
        self._opened = False

    # -- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Dispatcher:
        self._http = httpx.AsyncClient(timeout=30.0)
        self._opened = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stopping.set()
        for slot in list(self._slots.values()):
            await self._close_slot(slot)
        if self._http is not None:
            await self._http.aclose()
        self._opened = False

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Run every loop of the dispatcher until :meth:`stop`; a loop that dies stops them all."""
        if not self._opened:
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

    # -- loops ----------------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while not self._stopping.is_set():
            timeout = self.settings.safety_poll_s
            with contextlib.suppress(StoreError):
                due = await self.store.next_due_at()
                if due is not None:
                    timeout = max(0.0, min(timeout, (due - _now()).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                await self._sync_workers()
                if self._orphans:
                    await self._attach_orphans()
                while await self._dispatch_round():
                    pass
            except StoreError:
                logger.warning("dispatch_round_failed", exc_info=True)

    async def _notification_loop(self) -> None:
        async for note in self.store.listen():
            if note.channel == TASKS_CHANNEL:
                self._wake.set()
            elif note.channel == CANCEL_CHANNEL:
                attempt = self._attempts.get(note.payload)
                if attempt is not None:
                    attempt.cancel.set()
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
                # Only the attempts this dispatcher really holds: one it lost (e.g. to a store error) is left
                # to expire, so that it is adopted instead of stranded.
                await self.store.renew_leases(self.owner, self.settings.lease_s, list(self._attempts))
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
                    attempt.cancel.set()

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
            self._slots[worker_id] = _WorkerSlot(
                worker=worker, client=client, recent_models=list(worker.loaded_models)
            )
            logger.info("worker_attached worker_id=%s endpoint=%s", worker_id, worker.endpoint)

    async def _close_slot(self, slot: _WorkerSlot) -> None:
        self._slots.pop(slot.worker.id, None)
        for attempt in list(slot.attempts.values()):
            # The worker went away: its attempts cannot finish there.
            attempt.stop_reason = attempt.stop_reason or "worker_gone"
            attempt.cancel.set()
        with contextlib.suppress(Exception):
            await slot.client.__aexit__(None, None, None)
        logger.info("worker_detached worker_id=%s", slot.worker.id)

    def _capacity(self, slot: _WorkerSlot) -> int:
        return 1 + max(0, self.directory.prefetch(slot.worker))

    def _placement_slots(self) -> list[placement.Slot]:
        slots = []
        for slot in self._slots.values():
            if slot.retiring:
                continue
            capacity = self._capacity(slot)
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
        if not window_tasks:
            return False
        in_window = {task.id for task in window_tasks}
        for cache in (self._skips, self._facts):
            for task_id in [key for key in cache if key not in in_window]:
                del cache[task_id]
        window = [self._pending_view(task) for task in window_tasks]
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
        claimed = await self.store.claim_ids(
            self.owner, self.settings.lease_s, [tid for tid, _ in assignments]
        )
        targets = dict(assignments)
        for task in claimed:
            self._skips.pop(task.id, None)
            self._facts.pop(task.id, None)
            target = self._slots.get(targets[task.id])
            if target is None:  # the worker left while we claimed
                await self._release(task)
                continue
            self._start_attempt(target, task)
        return len(claimed) < len(assignments) or len(claimed) == free_total

    def _pending_view(self, task: Task) -> placement.PendingTask:
        types, models = self._graph_facts(task)
        return placement.PendingTask(
            id=task.id,
            priority=task.priority,
            pool=task.pool,
            node_types=types,
            models=models,
            skips=self._skips.get(task.id, 0),
        )

    def _graph_facts(self, task: Task) -> tuple[frozenset[str], frozenset[str]]:
        """Node types and model names of a task's graph, read once per task while it waits."""
        facts = self._facts.get(task.id)
        if facts is None:
            facts = self._facts[task.id] = (
                frozenset(node_types(task.payload)),
                frozenset(model_names(task.payload)),
            )
        return facts

    async def _fail_unplaceable(self, hopeless: list[placement.PendingTask]) -> None:
        claimed = await self.store.claim_ids(
            self.owner, self.settings.lease_s, [task.id for task in hopeless]
        )
        known = set().union(*(set(slot.worker.node_types or ()) for slot in self._slots.values()))
        for task in claimed:
            view = next(item for item in hopeless if item.id == task.id)
            missing = sorted(view.node_types - known)
            named = (
                ", ".join(missing)
                if missing
                else "(each is on some worker, but none of its pool has them all)"
            )
            lease = Lease(task.id, task.attempt, self.owner)
            with contextlib.suppress(StaleLease):
                failed = await self.store.fail_task(
                    lease,
                    f"no worker has the node types this workflow uses: {named}",
                    "missing_node_type",
                    {"missing_node_types": missing},
                )
                await self._publish_status(failed)

    async def _release(self, task: Task) -> None:
        with contextlib.suppress(StaleLease):
            released = await asyncio.shield(self.store.release_task(Lease(task.id, task.attempt, self.owner)))
            await self._publish_status(released)
        self._wake.set()

    def _start_attempt(self, slot: _WorkerSlot, task: Task, *, adopted: bool = False) -> None:
        assert self._group is not None
        attempt = _Attempt(
            task=task, lease=Lease(task.id, task.attempt, self.owner), worker_id=slot.worker.id
        )
        if task.cancel_requested:
            attempt.cancel.set()
        slot.attempts[task.id] = attempt
        self._attempts[task.id] = attempt
        self._group.create_task(self._run_attempt(slot, attempt, adopted=adopted), name=f"attempt-{task.id}")

    # -- one attempt ----------------------------------------------------------------------------
    async def _run_attempt(self, slot: _WorkerSlot, attempt: _Attempt, *, adopted: bool) -> None:
        task = attempt.task
        await self.directory.set_assignments(slot.worker.id, list(slot.attempts))
        try:
            if adopted and task.prompt_id and task.worker_id == slot.worker.id:
                await self._reattach(slot, attempt)
            else:
                await self._submit(slot, attempt)
            if attempt.submitted:
                await self._follow_and_finish(slot, attempt)
        except StaleLease:
            logger.info("attempt_fenced_out task_id=%s attempt=%s", task.id, attempt.lease.attempt)
        except asyncio.CancelledError:
            if not attempt.submitted:
                with contextlib.suppress(StoreError):
                    await asyncio.shield(self.store.release_task(attempt.lease))
            raise
        except PromptLost as exc:
            await self._retry_or_fail(attempt, "prompt_lost", f"the worker lost the prompt: {exc.reason}")
        except ComfyError as exc:
            await self.directory.report_unreachable(slot.worker.id, str(exc))
            await self._retry_or_fail(attempt, "worker_unreachable", f"worker {slot.worker.id} failed: {exc}")
        except StoreError:
            logger.exception("attempt_store_error task_id=%s", task.id)
        except OutputsError as exc:
            logger.warning("outputs_not_stored task_id=%s error=%s", task.id, exc)
            with contextlib.suppress(StoreError):
                await self._retry_or_fail(
                    attempt, "outputs_unavailable", f"the output files could not be stored: {exc}"
                )
        except Exception:
            logger.exception("attempt_crashed task_id=%s", task.id)
            with contextlib.suppress(StoreError):
                await self._retry_or_fail(attempt, "worker_unreachable", "internal error while dispatching")
        finally:
            slot.attempts.pop(task.id, None)
            self._attempts.pop(task.id, None)
            if slot.retiring and not slot.attempts:
                await self._close_slot(slot)
            if not self._stopping.is_set():
                with contextlib.suppress(Exception):
                    await self.directory.set_assignments(slot.worker.id, list(slot.attempts))
            self._wake.set()

    async def _submit(self, slot: _WorkerSlot, attempt: _Attempt) -> None:
        task = attempt.task
        if attempt.cancel.is_set():
            await self._finish_cancelled(attempt)
            return
        prompt_id = str(uuid.uuid4())
        attempt.prompt_id = prompt_id
        task = attempt.task = await self.store.record_dispatch(attempt.lease, slot.worker.id, prompt_id)
        await self._publish_status(task)
        try:
            assert self._http is not None
            graph = await prepare_inputs(
                task.id,
                task.payload,
                task.inputs,
                lambda data, name, subfolder: slot.client.upload_image(
                    data, name, subfolder=subfolder, overwrite=True
                ),
                http=self._http,
                max_bytes=self._max_input_bytes,
                allow_private=self.settings.allow_private_input_urls,
                outputs=self.outputs,
            )
        except InputError as exc:
            await self._fail(attempt, "input_invalid", str(exc))
            return
        # ComfyUI clients (through the gateway) send extra_data such as extra_pnginfo, which ComfyUI
        # embeds in the PNGs it saves; pass it on.
        comfyui = (task.metadata or {}).get("comfyui") if isinstance(task.metadata, dict) else None
        given = comfyui.get("extra_data") if isinstance(comfyui, dict) else None
        extra_data = {
            **(given if isinstance(given, dict) else {}),
            "comfyfleet": {"task_id": task.id, "attempt": task.attempt},
        }
        try:
            await slot.client.submit(graph, prompt_id=prompt_id, extra_data=extra_data)
        except WorkflowRejected as exc:
            message = _rejection_message(exc.error, exc.node_errors)
            await self._fail(
                attempt, "workflow_invalid", message, {"error": exc.error, "node_errors": exc.node_errors}
            )
            return
        attempt.submitted = True
        attempt.accepted_at = _now()
        runnable_since = max(task.created_at, task.not_before) if task.not_before else task.created_at
        metrics.observe_dispatch_latency((attempt.accepted_at - runnable_since).total_seconds())
        # The worker runs its prompts in order, so the models of the last one submitted are the ones it
        # will hold: placement plans with that, not with what it held before.
        models = model_names(task.payload)
        if models:
            slot.recent_models = placement.recent_models_after(slot.recent_models, models)
        task = attempt.task = await self.store.set_phase(attempt.lease, TaskPhase.QUEUED_ON_WORKER)
        await self._publish_status(task)
        logger.info(
            "prompt_submitted task_id=%s worker_id=%s prompt_id=%s", task.id, slot.worker.id, prompt_id
        )

    async def _reattach(self, slot: _WorkerSlot, attempt: _Attempt) -> None:
        """An adopted attempt: ask the worker what became of its prompt."""
        task = attempt.task
        assert task.prompt_id is not None
        attempt.prompt_id = task.prompt_id
        job = await slot.client.job(task.prompt_id)
        if job is None:
            if task.phase == TaskPhase.DISPATCHING:
                # Never reached the worker (or died with it): submitting now cannot run it twice.
                await self._submit(slot, attempt)
                return
            raise PromptLost(task.prompt_id, f"worker {slot.worker.id} does not know it any more")
        attempt.submitted = True
        logger.info(
            "attempt_reattached task_id=%s prompt_id=%s status=%s", task.id, task.prompt_id, job.get("status")
        )

    async def _follow_and_finish(self, slot: _WorkerSlot, attempt: _Attempt) -> None:
        assert attempt.prompt_id is not None
        prompt_id = attempt.prompt_id
        deadline = attempt.started_monotonic + attempt.task.timeout_s
        follow = asyncio.ensure_future(
            slot.client.follow(prompt_id, on_event=lambda event: self._on_event(attempt, event))
        )
        stop_wait = asyncio.ensure_future(attempt.cancel.wait())
        outcome: PromptOutcome | None = None
        try:
            done, _ = await asyncio.wait(
                {follow, stop_wait},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if follow in done:
                outcome = follow.result()
            else:
                if attempt.stop_reason is None:
                    attempt.stop_reason = "cancelled" if attempt.cancel.is_set() else "timeout"
                outcome = await self._stop_prompt(slot, attempt, follow)
        finally:
            for future in (follow, stop_wait):
                if not future.done():
                    future.cancel()
            await asyncio.gather(follow, stop_wait, return_exceptions=True)
        await self._finish(slot, attempt, outcome)

    async def _stop_prompt(
        self, slot: _WorkerSlot, attempt: _Attempt, follow: asyncio.Future[PromptOutcome]
    ) -> PromptOutcome | None:
        """Cancel or time out: dequeue or interrupt the prompt, then wait a grace period for it to stop."""
        assert attempt.prompt_id is not None
        if attempt.stop_reason != "worker_gone":
            with contextlib.suppress(ComfyError):
                await slot.client.cancel_job(attempt.prompt_id)
        try:
            return await asyncio.wait_for(asyncio.shield(follow), self.settings.interrupt_grace_s)
        except (PromptLost, ComfyError):
            return None  # dequeued before it ran (never enters history), or the worker is gone
        except TimeoutError:
            if attempt.stop_reason != "worker_gone":
                logger.warning(
                    "prompt_ignored_interrupt task_id=%s worker_id=%s prompt_id=%s",
                    attempt.task.id,
                    slot.worker.id,
                    attempt.prompt_id,
                )
                await self.directory.recycle(
                    slot.worker.id, f"prompt {attempt.prompt_id} ignored an interrupt"
                )
            return None

    async def _finish(self, slot: _WorkerSlot, attempt: _Attempt, outcome: PromptOutcome | None) -> None:
        task = attempt.task
        latest = {**attempt.progress, "nodes_total": len(task.payload)} if attempt.progress else None
        if latest is not None and latest != attempt.progress_written:
            # Progress writes are spaced out while a prompt runs; the task keeps the last one it reached.
            await self._write_progress(attempt, latest)
        status = outcome.status if outcome is not None else None
        if outcome is not None and status == "success":
            await self._collect(slot, attempt, outcome)
        elif attempt.stop_reason == "cancelled":
            await self._finish_cancelled(attempt)
        elif attempt.stop_reason == "timeout":
            message = f"task timed out after {task.timeout_s:g} s"
            if self.settings.retry_timeouts:
                await self._retry_or_fail(attempt, "timeout", message)
            else:
                await self._fail(attempt, "timeout", message)
        elif attempt.stop_reason == "worker_gone":
            await self._retry_or_fail(attempt, "worker_lost", f"worker {slot.worker.id} went away")
        elif outcome is not None and status == "error":
            error = outcome.error or {}
            kind = classify_execution_error(error)
            message, details = sanitize_execution_error(error)
            if kind == "out_of_memory":
                await self._retry_or_fail(attempt, kind, message, details)
            else:
                await self._fail(attempt, kind, message, details)
        elif status == "interrupted":
            await self._retry_or_fail(attempt, "interrupted", "the prompt was interrupted on the worker")
        else:
            await self._retry_or_fail(attempt, "prompt_lost", "the worker lost the prompt")
        if status in {"success", "error", "interrupted"} and attempt.prompt_id:
            # Keep long-lived workers small: the result is ours now.
            with contextlib.suppress(ComfyError):
                await slot.client.delete_history([attempt.prompt_id])

    async def _collect(self, slot: _WorkerSlot, attempt: _Attempt, outcome: PromptOutcome) -> None:
        task = attempt.task
        outputs: list[dict[str, Any]] = []
        texts: dict[str, list[str]] = {}
        used_names: set[str] = set()
        for node_id, ui in (outcome.outputs or {}).items():
            if not isinstance(ui, dict):
                continue
            for kind, items in ui.items():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, str) and kind == "text":
                        texts.setdefault(str(node_id), []).append(item)
                    if not (isinstance(item, dict) and isinstance(item.get("filename"), str)):
                        continue
                    name = item["filename"].replace("/", "_")
                    if name in used_names:
                        name = f"{node_id}-{name}"
                    used_names.add(name)
                    # The file is still on the worker: a storage hiccup is retried here, not by running the
                    # prompt again on the GPU.
                    async for try_ in stamina.retry_context(on=OutputsUnavailable, attempts=4, timeout=60.0):
                        with try_:
                            stored = await self._store_output(slot, task, str(node_id), kind, item, name)
                    outputs.append(stored)
        finished = _now()
        started = (
            attempt.execution_started_at or _history_start(outcome) or task.started_at or task.created_at
        )
        timings: dict[str, Any] = {
            "queued_s": round((started - task.created_at).total_seconds(), 6),
            "executing_s": round((finished - started).total_seconds(), 6),
            "total_s": round((finished - task.created_at).total_seconds(), 6),
            "execution_started_at": started.isoformat(),
        }
        if attempt.accepted_at is not None:
            timings["prompt_accepted_at"] = attempt.accepted_at.isoformat()
        if outcome.timings.ended_ms is not None:
            # The worker's own clock: when it finished the prompt (execution_success).
            timings["worker_finished_at"] = datetime.fromtimestamp(
                outcome.timings.ended_ms / 1000, UTC
            ).isoformat()
        result: dict[str, Any] = {
            "prompt_id": attempt.prompt_id,
            "worker_id": slot.worker.id,
            "outputs": outputs,
            "timings": timings,
        }
        if texts:
            result["text"] = texts
        completed = await self.store.complete_task(attempt.lease, result)
        if model_names(task.payload):
            with contextlib.suppress(Exception):
                await self.directory.note_loaded_models(slot.worker.id, slot.recent_models)
        await self._publish_status(completed)
        logger.info(
            "task_completed task_id=%s worker_id=%s outputs=%d", task.id, slot.worker.id, len(outputs)
        )

    async def _store_output(
        self, slot: _WorkerSlot, task: Task, node_id: str, kind: str, item: dict[str, Any], name: str
    ) -> dict[str, Any]:
        filename = item["filename"]
        subfolder = str(item.get("subfolder") or "")
        file_type = str(item.get("type") or "output")
        async with slot.client.download(filename, subfolder, file_type) as response:
            content_type = (response.headers.get("content-type") or "").split(";")[0].strip()
            if not content_type or content_type == "application/octet-stream":
                content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
            stored = await self.outputs.put(task.id, name, response.aiter_bytes(), content_type)
        return {
            "node_id": node_id,
            "kind": kind,
            "filename": stored.name,
            "subfolder": subfolder,
            "type": file_type,
            "content_type": stored.content_type,
            "size": stored.size,
            "url": f"/api/v1/tasks/{task.id}/outputs/{quote(stored.name)}",
        }

    # -- outcomes -------------------------------------------------------------------------------
    async def _fail(
        self, attempt: _Attempt, kind: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        failed = await self.store.fail_task(attempt.lease, message, kind, details)
        metrics.count_failure(kind)
        await self._publish_status(failed)
        logger.info("task_failed task_id=%s kind=%s", failed.id, kind)

    async def _retry_or_fail(
        self, attempt: _Attempt, kind: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        task = attempt.task
        if attempt.cancel.is_set() and attempt.stop_reason in {None, "cancelled"}:
            await self._finish_cancelled(attempt)
            return
        if task.retry_count >= task.max_retries:
            await self._fail(
                attempt, kind, f"{message} (gave up after {task.retry_count + 1} attempts)", details
            )
            return
        not_before = next_attempt_at(
            _now(), task.retry_count, base_s=self.settings.retry_base_s, max_s=self.settings.retry_max_s
        )
        retried = await self.store.retry_task(attempt.lease, not_before, message, kind, details)
        metrics.count_failure(kind)
        await self._publish_status(retried)
        logger.info(
            "task_retry_scheduled task_id=%s kind=%s not_before=%s", task.id, kind, not_before.isoformat()
        )

    async def _finish_cancelled(self, attempt: _Attempt) -> None:
        cancelled = await self.store.finish_cancelled(attempt.lease)
        await self._publish_status(cancelled)

    # -- events ---------------------------------------------------------------------------------
    def latest_preview(self, task_id: str) -> tuple[bytes, str, int] | None:
        """The newest preview image of a task this replica runs: bytes, content type, sequence number."""
        attempt = self._attempts.get(task_id)
        if attempt is None or attempt.preview is None:
            return None
        return (*attempt.preview, attempt.previews)

    async def _on_event(self, attempt: _Attempt, event: ComfyEvent) -> None:
        kind = event.type
        data = event.data or {}
        if kind == "preview" and event.image:
            # Kept in memory only, the newest one: previews are many and only the latest is worth showing.
            attempt.preview = (event.image, event.image_type or "image/jpeg")
            attempt.previews += 1
            await self.bus.publish(
                TaskEvent(
                    type="preview",
                    task_id=attempt.task.id,
                    tenant=attempt.task.tenant,
                    data={
                        "preview": attempt.previews,
                        "content_type": attempt.preview[1],
                        "url": f"/api/v1/tasks/{attempt.task.id}/preview",
                    },
                )
            )
            return
        if kind == "execution_start" and attempt.execution_started_at is None:
            attempt.execution_started_at = _now()
            with contextlib.suppress(StaleLease):
                attempt.task = await self.store.set_phase(attempt.lease, TaskPhase.EXECUTING)
                await self._publish_status(attempt.task)
            return
        if kind == "executing" and data.get("node") is not None:
            node = str(data["node"])
            class_type = (attempt.task.payload.get(node) or {}).get("class_type")
            attempt.progress = {"node": node, "class_type": class_type, "value": None, "max": None}
        elif kind == "progress":
            attempt.progress = {
                **attempt.progress,
                "node": str(data.get("node"))
                if data.get("node") is not None
                else attempt.progress.get("node"),
                "value": data.get("value"),
                "max": data.get("max"),
            }
        else:
            return
        nodes_total = len(attempt.task.payload)
        progress = {**attempt.progress, "nodes_total": nodes_total}
        await self.bus.publish(
            TaskEvent(type="progress", task_id=attempt.task.id, tenant=attempt.task.tenant, data=progress)
        )
        if time.monotonic() - attempt.last_progress_write >= _PROGRESS_WRITE_INTERVAL_S:
            await self._write_progress(attempt, progress)

    async def _write_progress(self, attempt: _Attempt, progress: dict[str, Any]) -> None:
        attempt.last_progress_write = time.monotonic()
        attempt.progress_written = progress
        with contextlib.suppress(StaleLease):
            await self.store.set_progress(attempt.lease, progress)

    async def _publish_status(self, task: Task) -> None:
        if task.is_terminal and task.completed_at is not None:
            metrics.observe_task_duration(
                str(task.status), (task.completed_at - task.created_at).total_seconds()
            )
        data: dict[str, Any] = {
            "status": str(task.status),
            "phase": str(task.phase) if task.phase else None,
            "worker_id": task.worker_id,
            "attempt": task.attempt,
            "retry_count": task.retry_count,
        }
        if task.error:
            data["error"] = task.error
            data["error_kind"] = task.error_kind
        if task.status == TaskStatus.COMPLETED and task.result:
            data["outputs"] = task.result.get("outputs", [])
        await self.bus.publish(TaskEvent(type="status", task_id=task.id, tenant=task.tenant, data=data))
        if task.status == TaskStatus.PENDING:
            # Back in the queue (retry or release): let every replica's dispatcher look again.
            with contextlib.suppress(StoreError):
                await self.store.notify(TASKS_CHANNEL, json.dumps({"task_id": task.id}))

    # -- recovery -------------------------------------------------------------------------------
    async def _adopt(self, previous_owner: str | None = None) -> None:
        adopted = await self.store.adopt_expired(
            self.owner, self.settings.lease_s, previous_owner=previous_owner
        )
        deadline = time.monotonic() + self._orphan_wait_s
        for task in adopted:
            if task.id not in self._attempts:
                self._orphans[task.id] = (task, deadline)
        await self._attach_orphans()

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
                waiting = task.prompt_id and task.worker_id and time.monotonic() < deadline
                if waiting and not await self._worker_gone(task.worker_id or ""):
                    continue
                del self._orphans[task_id]
                attempt = _Attempt(
                    task=task, lease=Lease(task.id, task.attempt, self.owner), worker_id=task.worker_id or ""
                )
                with contextlib.suppress(StaleLease):
                    if not task.prompt_id:
                        await self._release(task)  # never reached a worker
                    else:
                        await self._retry_or_fail(
                            attempt, "worker_lost", f"its worker {task.worker_id} is no longer available"
                        )

    async def _worker_gone(self, worker_id: str) -> bool:
        try:
            worker = await self.store.get_worker(worker_id)
        except NotFound:
            return True
        return worker.state in {WorkerState.FAILED, WorkerState.TERMINATED, WorkerState.TERMINATING}


class _Stop(Exception):
    """Raised inside the TaskGroup to end :meth:`Dispatcher.run` cleanly."""


def _history_start(outcome: PromptOutcome) -> datetime | None:
    started = outcome.timings.started_ms
    return datetime.fromtimestamp(started / 1000, UTC) if started is not None else None


def _rejection_message(error: dict[str, Any], node_errors: dict[str, Any]) -> str:
    parts = [str(error.get("message") or "workflow rejected by ComfyUI")]
    details = error.get("details")
    if details:
        parts.append(str(details))
    for node_id, node in (node_errors or {}).items():
        for item in node.get("errors", []) if isinstance(node, dict) else []:
            parts.append(
                f"node {node_id} ({node.get('class_type')}): {item.get('message')} {item.get('details', '')}".strip()
            )
    return "; ".join(parts)
