"""The task service: the one place where tasks are submitted, cancelled and given a new priority.

Every front door (the REST API, the ComfyUI gateway, Comfy API v2) turns its own wire format into a command
(:mod:`comfyfleet.tasks.commands`) and hands it here; what is checked, how a repeated request is recognised,
what is stored, which live event is published and which dispatcher wake-up is sent is decided once, here.
Refusals are :class:`~comfyfleet.tasks.errors.TaskCommandError` subclasses that each front door words its own way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from comfyfleet.background import Background
from comfyfleet.config import Settings
from comfyfleet.dispatch.inputs import stored_input
from comfyfleet.domain import TERMINAL_STATUSES, NewTask, Task, TaskStatus
from comfyfleet.events import CANCEL_CHANNEL, TASKS_CHANNEL, EventBus, Subscription, TaskEvent, status_event
from comfyfleet.store import Conflict, NotFound, Store, StoreError
from comfyfleet.tasks import checks
from comfyfleet.tasks.catalogue import WorkerCatalogue
from comfyfleet.tasks.commands import (
    CancelTask,
    ChangePriority,
    GraphCheck,
    Idempotency,
    OnReuse,
    SubmitTask,
    Submitted,
)
from comfyfleet.tasks.errors import IdempotencyConflict, TaskNotFound, TaskStateConflict
from comfyfleet.tasks.ids import TaskIds
from comfyfleet.tasks.models import check_models, task_policy

if TYPE_CHECKING:
    from comfyfleet.models.service import ModelService

logger = logging.getLogger(__name__)

# How many keys held apart from tasks are claimed between two sweeps of the expired ones.
_PURGE_KEYS_EVERY = 500

# What makes two submissions "the same request" for an idempotency key.
_REQUEST_FIELDS = (
    "payload",
    "workflow_id",
    "priority",
    "max_retries",
    "timeout_s",
    "pool",
    "inputs",
    "webhook",
    "metadata",
    "models",
)


def _ends(event: TaskEvent) -> bool:
    """Whether a task event announces the task's end (what a waiting submission waits for)."""
    return event.type == "status" and event.data.get("status") in TERMINAL_STATUSES


class TaskService:
    """Commands on tasks. ``bus`` (live events) and ``catalogue`` (the fleet's node catalogue, for
    :attr:`GraphCheck.FLEET`) are optional: without them no event is published and graphs are checked
    for their shape only."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        bus: EventBus | None = None,
        catalogue: WorkerCatalogue | None = None,
        models: ModelService | None = None,
    ) -> None:
        self._settings = settings
        self._models = models
        self._limits = settings.limits
        self._dispatch = settings.dispatch
        self._store = store
        self._bus = bus
        self._catalogue = catalogue
        self._known_pools = checks.known_pools(settings)
        self._new_id = TaskIds()
        self._listeners: list[Callable[[Task], None]] = []
        self._keys_claimed = 0
        self._wakes = Background()

    def add_listener(self, listener: Callable[[Task], None]) -> None:
        """Call ``listener(task)`` for every change this service announces, just before the announcement, so a
        cache of the queue (the gateway's queue length) is dropped before anyone hears of the change."""
        self._listeners.append(listener)

    # -- submit ---------------------------------------------------------------------------------
    async def submit(self, command: SubmitTask, *, wait_s: float | None = None) -> Submitted:
        """Check and store ``command`` as a pending task and wake the dispatcher. With ``wait_s``, answer
        only when the task ended or that many seconds passed (with the task as it then stands)."""
        # Before anything reads the store: a value no store can keep must not reach one.
        checks.check_storable(command)
        idempotency = command.idempotency
        if idempotency is not None and idempotency.names_task:
            existing = await self._named_task(idempotency, command.tenant)
            if existing is not None:
                return await self._replayed(existing, wait_s)
        node_errors = await self._check(command)
        models = await check_models(command.models, task_policy(self._settings, command.pool), self._models)
        new = self._new_task(command, models)
        if idempotency is not None and idempotency.remember_s is not None:
            await self._claim_key(idempotency, new)
        try:
            task, created = await self._store.create_task(new)
        except Conflict:
            if idempotency is None or not idempotency.names_task:
                raise
            # The same client-chosen id, posted twice at once: the other request created it.
            existing = await self._named_task(idempotency, command.tenant)
            if existing is None:
                raise
            return await self._replayed(existing, wait_s)
        if not created:
            assert idempotency is not None  # the store dedupes only on an idempotency key
            self._check_reuse(idempotency, new, task)
            return await self._replayed(task, wait_s)
        # Live listeners (the dashboard's task list, ComfyUI sockets' queue length) see it arrive.
        await self._announce(task)
        if wait_s and self._bus is not None:
            # Subscribed before the dispatcher is woken, so the end of the task cannot be missed.
            with self._bus.subscribe(task_id=task.id, only=_ends) as subscription:
                self._wake_dispatcher(task)
                task = await self._wait_until_ended(task, subscription, wait_s, fresh=True)
        else:
            self._wake_dispatcher(task)
        return Submitted(task, True, node_errors)

    async def _check(self, command: SubmitTask) -> dict[str, Any]:
        """Every check of a submission, in the order its problems are reported; the ``node_errors`` of
        outputs a fleet check skipped while others passed."""
        limits = self._limits
        checks.check_api_format(command.payload)
        checks.check_priority(command.priority, limits)
        node_errors = await self._check_graph(command)
        checks.check_inputs(command.inputs, max_bytes=limits.max_input_bytes)
        checks.check_stored_inputs(command.inputs, command.stored_inputs)
        checks.check_webhook(command.webhook)
        checks.check_pool(command.pool, self._known_pools)
        return node_errors

    async def _check_graph(self, command: SubmitTask) -> dict[str, Any]:
        max_nodes = self._limits.max_nodes
        object_info = None
        if command.graph_check is GraphCheck.FLEET and self._catalogue is not None:
            object_info = await self._catalogue.object_info()
        if object_info is None:
            checks.check_structure(command.payload, max_nodes=max_nodes)
            return {}
        checks.check_size(command.payload, max_nodes=max_nodes)
        attached = {spec.get("name") for spec in command.inputs or [] if isinstance(spec, dict)}
        attached.update(stored.name for stored in command.stored_inputs)
        return checks.check_against_catalogue(
            command.payload,
            object_info,
            attached={name for name in attached if isinstance(name, str)},
            targets=command.partial_execution_targets,
        )

    def _new_task(self, command: SubmitTask, models: list[dict[str, Any]] | None) -> NewTask:
        idempotency = command.idempotency
        names_task = idempotency is not None and idempotency.names_task
        priority = command.priority
        if command.front:
            priority = min(priority + 1, self._limits.max_priority)
        return NewTask(
            id=idempotency.key if idempotency is not None and names_task else self._new_id(),
            payload=command.payload,
            workflow_id=command.workflow_id,
            priority=priority,
            max_retries=command.max_retries
            if command.max_retries is not None
            else self._dispatch.default_max_retries,
            timeout_s=command.timeout_s
            if command.timeout_s is not None
            else self._dispatch.default_timeout_s,
            tenant=command.tenant,
            idempotency_key=idempotency.key
            if idempotency is not None and not names_task and idempotency.remember_s is None
            else None,
            pool=command.pool,
            inputs=self._inputs(command),
            webhook=command.webhook,
            metadata=command.metadata,
            models=models,
        )

    @staticmethod
    def _inputs(command: SubmitTask) -> list[dict[str, Any]] | None:
        if not command.stored_inputs:
            return command.inputs
        stored = [
            stored_input(item.name, item.folder, item.key, size=item.size, asset_id=item.asset_id)
            for item in command.stored_inputs
        ]
        return [*(command.inputs or []), *stored]

    async def _claim_key(self, idempotency: Idempotency, new: NewTask) -> None:
        """Claim a key held apart from tasks for the task about to be stored, or refuse its reuse."""
        assert idempotency.remember_s is not None
        assert new.id is not None
        holder = await self._store.claim_idempotency_key(
            new.tenant, idempotency.key, new.id, idempotency.remember_s
        )
        if holder is not None:
            raise IdempotencyConflict(
                "idempotency_key_reused",
                f"the idempotency key {idempotency.key!r} was already used; keys are used once: poll or "
                "list your jobs to find the one it created, or use a new key",
                idempotency.key,
                holder,
            )
        self._keys_claimed += 1
        if self._keys_claimed % _PURGE_KEYS_EVERY == 0:
            # Expired keys are taken over by a new claim anyway; this only keeps the table small.
            try:
                purged = await self._store.purge_idempotency_keys()
            except StoreError as exc:
                logger.warning("idempotency_key_purge_failed error=%s", exc)
            else:
                logger.info("idempotency_keys_purged count=%d", purged)

    async def _named_task(self, idempotency: Idempotency, tenant: str) -> Task | None:
        """The task a client-chosen id already names, if any; refused when it is another tenant's or the key
        may be used once."""
        try:
            task = await self._store.get_task(idempotency.key)
        except NotFound:
            return None
        if task.tenant != tenant:
            # Say no more than that the id is taken: the task is not the caller's to see.
            raise IdempotencyConflict(
                "task_id_in_use", f"the task id {idempotency.key} is already in use", idempotency.key, None
            )
        if idempotency.on_reuse is OnReuse.REFUSE:
            raise _key_reused(idempotency, task, "was already used")
        return task

    @staticmethod
    def _check_reuse(idempotency: Idempotency, new: NewTask, task: Task) -> None:
        if idempotency.on_reuse is OnReuse.REFUSE:
            raise _key_reused(idempotency, task, "was already used")
        same = all(getattr(new, name) == getattr(task, name) for name in _REQUEST_FIELDS)
        if idempotency.on_reuse is OnReuse.REPLAY_SAME_REQUEST and not same:
            # The key names one request: a retry must send the same one, or it would silently get another's task.
            raise _key_reused(idempotency, task, "was already used for a different request")

    async def _replayed(self, task: Task, wait_s: float | None) -> Submitted:
        if wait_s and self._bus is not None:
            with self._bus.subscribe(task_id=task.id, only=_ends) as subscription:
                task = await self._wait_until_ended(task, subscription, wait_s)
        return Submitted(task, False)

    async def _wait_until_ended(
        self, task: Task, subscription: Subscription, wait_s: float, *, fresh: bool = False
    ) -> Task:
        """The task once ended (or as it stands after ``wait_s``). ``fresh``: ``task`` was just stored and
        ``subscription`` opened before anyone could change it, so it needs no second look."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        if not fresh:
            task = await self._store.get_task(task.id)
        while task.status not in TERMINAL_STATUSES:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            event = await subscription.get(wait_s=remaining)  # only endings are queued: see _ends
            # This replica's own ending carries the task as written; another's is read back.
            ended = event.task if event is not None else None
            task = ended if ended is not None else await self._store.get_task(task.id)
        return task

    # -- cancel and priority --------------------------------------------------------------------
    async def cancel(self, command: CancelTask) -> Task:
        """Cancel a pending task at once, or ask the dispatcher running it to stop it (the task comes back
        ``running`` with ``cancel_requested``). :class:`TaskStateConflict` once it ended."""
        try:
            task = await self._store.cancel_task(command.task_id, tenant=command.tenant)
        except NotFound as exc:
            raise TaskNotFound(str(exc)) from exc
        except Conflict as exc:
            raise TaskStateConflict(str(exc)) from exc
        if task.status is TaskStatus.RUNNING:
            logger.info("task_cancel_requested task_id=%s", task.id)
            self._wake(CANCEL_CHANNEL, task.id)
            return task
        if task.status is not TaskStatus.CANCELLED:
            # The store resolved the race differently (e.g. the task ended meanwhile); say so plainly.
            raise TaskStateConflict(f"task {task.id} is already {task.status.value}")
        logger.info("task_cancelled task_id=%s", task.id)
        # No dispatcher saw this one: tell live listeners (event streams, dashboard, ComfyUI sockets) here.
        await self._announce(task)
        return task

    async def change_priority(self, command: ChangePriority) -> Task:
        """Move a pending task up or down the queue. :class:`TaskStateConflict` once it left ``pending``."""
        checks.check_priority(command.priority, self._limits)
        try:
            task = await self._store.set_priority(command.task_id, command.priority, tenant=command.tenant)
        except NotFound as exc:
            raise TaskNotFound(str(exc)) from exc
        except Conflict as exc:
            raise TaskStateConflict(str(exc)) from exc
        logger.info("task_priority_changed task_id=%s priority=%d", task.id, task.priority)
        await self._announce(task)  # live listeners re-read their queue positions
        return task

    # -- announcements and wake-ups -------------------------------------------------------------
    async def _announce(self, task: Task) -> None:
        for listener in self._listeners:
            listener(task)
        if self._bus is not None:
            await self._bus.publish(status_event(task))

    def _wake_dispatcher(self, task: Task) -> None:
        self._wake(TASKS_CHANNEL, f'{{"task_id":"{task.id}"}}')

    def _wake(self, channel: str, payload: str) -> None:
        """Send a wake-up after the change it announces is durable, without the caller waiting for it (on
        PostgreSQL that is a round trip): the answer to a submission need not wait for the dispatcher's."""
        self._wakes.start(self._send_wake(channel, payload))

    async def _send_wake(self, channel: str, payload: str) -> None:
        # The change is already durable; a lost wake-up only delays the dispatcher until its safety poll,
        # so it must not turn a stored submission or cancel into an error.
        try:
            await self._store.notify(channel, payload)
        except StoreError as exc:
            logger.warning("wakeup_failed channel=%s error=%s", channel, exc)


def _key_reused(idempotency: Idempotency, task: Task, what: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        "idempotency_key_reused",
        f"the idempotency key {idempotency.key!r} {what} (task {task.id}); "
        + (
            "send the same request to get that task back, or use a new key"
            if idempotency.on_reuse is OnReuse.REPLAY_SAME_REQUEST
            else "use a new key"
        ),
        idempotency.key,
        task.id,
    )
