"""What the store knows of one attempt, and every write about it.

Each write carries the attempt's lease (task id, attempt number, owner: the fencing token). A patient record
does not give up on a write the store cannot take (an outage, a full disk): it writes again with back-off
until the store answers, while its attempt stays in the dispatcher's memory (its lease renewed, cancel
requests reaching it). A write whose answer was lost may have landed; a refusal of the next try is then read
back: the attempt's entry in the task's ``attempts`` says it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import stamina

from comfyfleet import metrics
from comfyfleet.config import DispatchSettings
from comfyfleet.dispatch.clock import Clock
from comfyfleet.dispatch.models import TaskModels
from comfyfleet.dispatch.retry import next_attempt_at
from comfyfleet.domain import Task, TaskPhase, TaskStatus
from comfyfleet.events import TASKS_CHANNEL, EventBus, status_event
from comfyfleet.fleet.base import WorkerDirectory
from comfyfleet.outputs import OutputStore
from comfyfleet.store import Lease, StaleLease, Store, StoreError, StoreUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Back-off between tries of a write the store could not take: quick at first (a lost connection is
# replaced at once), then every few seconds, so the attempt goes on within seconds of the store's return.
_WRITE_WAIT_INITIAL_S = 0.1
_WRITE_WAIT_MAX_S = 2.0
_WRITE_WAIT_JITTER_S = 0.25
# A phase change (queued on the worker, executing) reaches the store this long after it happens, unless the
# attempt ends first: the end write carries the task on, and a short task costs no phase writes at all.
PHASE_WRITE_DELAY_S = 0.25


@dataclass(frozen=True, slots=True)
class AttemptContext:
    """What every attempt of one dispatcher shares."""

    store: Store
    directory: WorkerDirectory
    outputs: OutputStore
    settings: DispatchSettings
    bus: EventBus
    clock: Clock
    http: httpx.AsyncClient
    max_input_bytes: int
    models: TaskModels | None = None  # puts tasks' own model files on workers (None: tasks bring none)


async def publish_status(bus: EventBus, store: Store, task: Task) -> None:
    """Tell live listeners of a task's new status; a task back in the queue wakes every dispatcher."""
    if task.is_terminal and task.completed_at is not None:
        metrics.observe_task_duration(str(task.status), (task.completed_at - task.created_at).total_seconds())
    await bus.publish(status_event(task))
    if task.status == TaskStatus.PENDING:
        # Back in the queue (retry or release): let every replica's dispatcher look again.
        try:
            back: dict[str, str] = {"task_id": task.id}
            if task.not_before is not None:
                back["not_before"] = task.not_before.isoformat()  # heard by every dispatcher's ``NextDue``
            await store.notify(TASKS_CHANNEL, json.dumps(back))
        except StoreError:
            logger.debug("wake_up_not_sent task_id=%s", task.id, exc_info=True)


class AttemptRecord:
    """The store's side of one attempt: ``task`` as last written, and its lease."""

    def __init__(self, ctx: AttemptContext, task: Task, owner: str, *, patient: bool = True) -> None:
        self.ctx = ctx
        self.task = task
        self.lease = Lease(task.id, task.attempt, owner)
        # A patient record (an attempt that runs) writes until the store answers; the dispatcher's own
        # short writes (release, orphans) try once and are tried again by its loops.
        self._patient = patient
        self._failed_tries = 0
        self._phase_writer: asyncio.Task[None] | None = None
        self._phase_writing = False

    def adopt(self, task: Task) -> None:
        """This dispatcher adopted the attempt again (its lease ran out while the store was away): its
        writes go on under the new lease."""
        self.lease = Lease(task.id, task.attempt, self.lease.owner)

    async def publish(self, task: Task | None = None) -> None:
        await publish_status(self.ctx.bus, self.ctx.store, task or self.task)

    # -- writing --------------------------------------------------------------------------------
    async def _until_answered(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()  # the usual case, without the retry machinery
        except StoreUnavailable as exc:
            if not self._patient:
                raise
            logger.warning(
                "attempt_store_write_failed task_id=%s write=%s error=%s (trying again until the store answers)",
                self.task.id,
                what,
                exc,
            )
            self._failed_tries += 1
        tries = 1
        async for try_ in stamina.retry_context(
            on=StoreUnavailable,
            attempts=None,
            timeout=None,
            wait_initial=_WRITE_WAIT_INITIAL_S,
            wait_max=_WRITE_WAIT_MAX_S,
            wait_jitter=_WRITE_WAIT_JITTER_S,
        ):
            with try_:
                tries += 1
                try:
                    result = await call()
                except StoreUnavailable:
                    self._failed_tries += 1
                    raise
                logger.info(
                    "attempt_store_write_recovered task_id=%s write=%s tries=%d", self.task.id, what, tries
                )
                return result
        raise AssertionError("retried without end")  # pragma: no cover

    async def _write(self, what: str, write: Callable[[Lease], Awaitable[T]]) -> T:
        while True:
            lease = self.lease
            try:
                return await self._until_answered(what, functools.partial(write, lease))
            except StaleLease:
                if self.lease != lease:
                    continue  # adopted again meanwhile: the same write under the new lease
                raise

    async def update(self, what: str, write: Callable[[Lease], Awaitable[Task]]) -> Task:
        """A write that changes the running attempt (its dispatch record, its phase); it may be repeated."""
        self.task = await self._write(what, write)
        return self.task

    async def update_soon(self, write: Callable[[Lease], Awaitable[T]]) -> T | None:
        """Phase and progress while the prompt runs: skipped while the store cannot answer (the next one,
        or the end of the attempt, brings the task up to date) or once the lease is lost."""
        try:
            return await write(self.lease)
        except (StaleLease, StoreUnavailable) as exc:
            logger.debug("attempt_update_skipped task_id=%s error=%s", self.task.id, exc)
            return None

    def set_phase_soon(self, phase: TaskPhase) -> Task:
        """The attempt moved on: the task as it is now, at once (publish it to live listeners); the store
        hears of the phase after ``PHASE_WRITE_DELAY_S`` unless the attempt has ended by then."""
        self.task = dataclasses.replace(self.task, phase=phase, updated_at=self.ctx.clock.now())
        if self._phase_writer is None or self._phase_writer.done():
            self._phase_writer = asyncio.ensure_future(self._write_phase_later())
        return self.task

    async def _write_phase_later(self) -> None:
        # Real time, not the dispatcher's clock: a delay of the plumbing, not a rule of the task's life.
        await asyncio.sleep(PHASE_WRITE_DELAY_S)
        self._phase_writing = True
        phase, store = self.task.phase, self.ctx.store
        try:
            if phase is not None:
                await self.update_soon(lambda lease: store.set_phase(lease, phase))
        except StoreError as exc:  # the store closed under it: the attempt's end (or adoption) says the rest
            logger.debug("phase_write_skipped task_id=%s error=%s", self.task.id, exc)
        finally:
            self._phase_writing = False

    def drop_phase_write(self) -> asyncio.Task[None] | None:
        """Drop a phase write not sent yet; returns one on its way (or None)."""
        writer, self._phase_writer = self._phase_writer, None
        if writer is None or writer.done():
            return None
        if not self._phase_writing:
            writer.cancel()
            return None
        return writer

    async def _settle_phase_write(self) -> None:
        """Before the attempt's end: a phase write not sent yet is dropped (the end supersedes it), one on
        its way is waited for (so the store sees them in order)."""
        writer = self.drop_phase_write()
        if writer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def end(
        self, what: str, write: Callable[[Lease], Awaitable[Task]], *, recorded: bool = True
    ) -> Task:
        """A write that ends the attempt (``recorded``: it appends the attempt to the task's ``attempts``).
        When an earlier try's answer was lost and the write is now refused, the task is read back: if the
        write landed, that is its answer."""
        await self._settle_phase_write()
        failed_before = self._failed_tries
        while True:
            lease = self.lease
            try:
                task = await self._until_answered(what, functools.partial(write, lease))
                break
            except StaleLease:
                if self.lease != lease:
                    continue
                if self._failed_tries == failed_before:
                    raise
                current = await self._until_answered(
                    "read back", functools.partial(self.ctx.store.get_task, lease.task_id)
                )
                if recorded and not _holds(current, lease):
                    raise
                task = current
                break
        self.task = task
        return task

    # -- ends -----------------------------------------------------------------------------------
    async def fail(self, kind: str, message: str, details: dict[str, Any] | None = None) -> None:
        store = self.ctx.store
        failed = await self.end("fail", lambda lease: store.fail_task(lease, message, kind, details))
        metrics.count_failure(kind)
        await self.publish(failed)
        logger.info("task_failed task_id=%s kind=%s", failed.id, kind)

    async def retry_or_fail(
        self, kind: str, message: str, details: dict[str, Any] | None = None, *, cancelled: bool = False
    ) -> None:
        """Back to the queue after a back-off, unless the task used up its retries (failed) or its cancel
        was asked for (cancelled)."""
        task, settings, store = self.task, self.ctx.settings, self.ctx.store
        if cancelled:
            await self.finish_cancelled()
            return
        if task.retry_count >= task.max_retries:
            await self.fail(kind, f"{message} (gave up after {task.retry_count + 1} attempts)", details)
            return
        not_before = next_attempt_at(
            self.ctx.clock.now(), task.retry_count, base_s=settings.retry_base_s, max_s=settings.retry_max_s
        )
        retried = await self.end(
            "retry", lambda lease: store.retry_task(lease, not_before, message, kind, details)
        )
        metrics.count_failure(kind)
        await self.publish(retried)
        logger.info(
            "task_retry_scheduled task_id=%s kind=%s not_before=%s", task.id, kind, not_before.isoformat()
        )

    async def finish_cancelled(self) -> None:
        store = self.ctx.store
        await self.publish(await self.end("cancel", store.finish_cancelled))

    async def release(self) -> None:
        """Back to the queue without counting a try (the prompt was never sent)."""
        store = self.ctx.store
        await self.publish(await self.end("release", store.release_task, recorded=False))


def _holds(task: Task, lease: Lease) -> bool:
    """Whether ``task.attempts`` records the attempt of ``lease`` as ended."""
    return any(
        entry.get("attempt") == lease.attempt and entry.get("owner") == lease.owner
        for entry in task.attempts
        if isinstance(entry, dict)
    )
