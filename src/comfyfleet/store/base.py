"""The store's ports: the durable queue of tasks, the worker records, the webhook outbox and coordination.

One small protocol per role (:class:`TaskQueue` for the front doors, :class:`DispatchQueue` for the
dispatcher, :class:`WorkerRecords`, :class:`WebhookOutbox`, :class:`AssetRecords`,
:class:`IdempotencyKeys`, :class:`Coordination`); :class:`Store` is all of
them, which every backend provides. Backends are picked by URL scheme in ``comfyfleet.store.open_store``; the
behaviour is written once in ``sql.py`` and each dialect module (``sqlite.py``, ``postgres.py``) keeps only its
SQL text and its connection handling. The behavioural contract suite in ``tests/store`` runs against both.

Fencing: every write about a running attempt carries a :class:`Lease` (task id, attempt number, owner).
A write whose lease is no longer current raises :class:`StaleLease`, so a replica that lost a task can
never overwrite what the new owner wrote.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, Self

from comfyfleet.domain import (
    Asset,
    Blob,
    ModelFile,
    NewTask,
    QueueMetrics,
    Task,
    TaskPhase,
    TaskStatus,
    Worker,
    WorkerMetrics,
)


class StoreError(Exception):
    """Root of every store error."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or is not migrated; try again later."""


class NotFound(StoreError):
    """No such task or worker (for this tenant)."""


class Conflict(StoreError):
    """The request is valid but the record's state forbids it (e.g. cancelling a finished task)."""


class StaleLease(StoreError):
    """A write about an attempt that is no longer current (another owner or a newer attempt has it)."""


class StoreClosed(StoreError):
    """Used before ``__aenter__`` or after ``__aexit__``."""


class InvalidArgument(StoreError, ValueError):
    """A malformed argument the caller passed through from its own caller (e.g. a cursor this store never
    issued, a page limit out of range): a client error, not an outage."""


@dataclass(frozen=True, slots=True)
class Lease:
    """The fencing token for one attempt of one task, held by one dispatcher (``owner``)."""

    task_id: str
    attempt: int
    owner: str


@dataclass(frozen=True, slots=True)
class TaskPage:
    tasks: list[Task]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """The one webhook delivery of a task that ended with a ``webhook`` URL (the outbox row).

    ``status``: ``pending`` (an attempt is due at ``next_attempt_at``), ``delivered`` or ``failed`` (gave
    up). ``history`` lists every attempt: ``{"attempt", "at", "status_code", "error", "duration_ms"}``.
    """

    id: int
    task_id: str
    tenant: str
    url: str
    event: str  # task.completed | task.failed | task.cancelled
    message_id: str  # the webhook-id header, the same on every retry
    status: str
    attempts: int
    next_attempt_at: datetime
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    history: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Notification:
    """A wake-up: ``channel`` is e.g. ``"tasks"``, ``"task:<id>"``, ``"workers"``; ``payload`` is small JSON text."""

    channel: str
    payload: str


class TaskQueue(Protocol):
    """The front doors' side of the queue: submit, read, cancel and reorder tasks."""

    async def create_task(self, new: NewTask) -> tuple[Task, bool]:
        """Insert a pending task. With an idempotency key already used by the same tenant, return the
        original task and ``False`` instead of inserting."""

    async def get_task(self, task_id: str, tenant: str | None = None) -> Task:
        """Raise :class:`NotFound` when unknown or owned by another tenant (``tenant=None`` sees all)."""

    async def task_status(self, task_id: str, tenant: str | None = None) -> TaskStatus | None:
        """Only the status (a light read); None when unknown or owned by another tenant."""

    async def list_tasks(
        self,
        *,
        tenant: str | None = None,
        statuses: Collection[TaskStatus] | None = None,
        workflow_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        """Newest first; ``cursor`` is the opaque ``next_cursor`` of the previous page (or
        :func:`~comfyfleet.store.cursor_after` a task of it).

        Lists read what lists show: no ``payload`` (it is ``{}``; :meth:`get_task` has it), and ``inputs``
        without their bytes (each spec without ``data``, with the decoded ``size``)."""

    async def queue_position(self, task_id: str) -> int | None:
        """1 = next to run among pending tasks, by priority then FIFO; None when not pending.

        Exactly the order of :meth:`DispatchQueue.peek_pending` without a pool filter: the runnable
        pending tasks ahead, plus one. A pending task not due yet (a retry waiting for ``not_before``) gets
        the place it will have once due. Costs a count of the tasks ahead, so it grows with the depth of
        the queue."""

    async def queue_metrics(self, tenant: str | None = None) -> QueueMetrics: ...

    async def demand_by_pool(self) -> dict[str | None, tuple[int, int]]:
        """``pool -> (runnable pending, running)`` for the autoscaler; ``None`` is tasks with no pool."""

    async def count_by_status_and_priority(self) -> list[tuple[TaskStatus, int, int]]:
        """``(status, priority, count)`` rows for metrics."""

    async def cancel_task(self, task_id: str, tenant: str | None = None) -> Task:
        """A pending task becomes ``cancelled`` at once. A running one gets ``cancel_requested`` (the
        dispatcher that owns it stops the prompt and calls :meth:`DispatchQueue.finish_cancelled`). A
        finished task raises :class:`Conflict`; an unknown one :class:`NotFound`."""

    async def set_priority(self, task_id: str, priority: int, tenant: str | None = None) -> Task:
        """Move a pending task in the queue by giving it another priority (its FIFO place among equals is
        kept: its submission order). :class:`Conflict` once it left ``pending``; :class:`NotFound` if unknown."""


class DispatchQueue(Protocol):
    """The dispatcher's side of the queue: look at the head, claim, then write about each attempt under its
    :class:`Lease`, renew the leases it holds and adopt the attempts whose owner died.

    Claiming is two steps, as the dispatcher plans: :meth:`peek_pending` (or :meth:`peek_pending_per_tenant`)
    reads the head of the queue, the dispatcher places what it can, and :meth:`claim_ids` takes exactly those
    tasks. A task another claimer took in between is skipped, never claimed twice."""

    async def peek_pending(self, *, limit: int, pools: Collection[str | None] | None = None) -> list[Task]:
        """Read-only: the first ``limit`` runnable pending tasks (``not_before`` passed), highest priority
        first then oldest (claim order). With ``pools``, only tasks whose ``pool`` is in it (``None`` in it
        matches tasks with no pool)."""

    async def peek_pending_per_tenant(
        self, *, limit: int, pools: Collection[str | None] | None = None
    ) -> list[Task]:
        """Read-only: for every tenant with runnable pending tasks, its first ``limit`` in claim order (for
        fair share between tenants); all of them in claim order."""

    async def running_per_tenant(self) -> dict[str, int]:
        """How many tasks each tenant has running (tenants with none are left out)."""

    async def claim_ids(
        self,
        owner: str,
        lease_s: float,
        task_ids: Collection[str],
        assigned: Mapping[str, tuple[str, str]] | None = None,
    ) -> list[Task]:
        """Atomically make these tasks ``running``/``dispatching`` with ``attempt + 1`` and a lease of
        ``lease_s`` for ``owner``, skipping any that are no longer runnable pending (another claimer took
        them, or they were cancelled). Returned in claim order. Concurrent claimers never get the same task.
        ``assigned`` (task id -> worker id, prompt id) records the dispatch of those tasks in the same write,
        as :meth:`record_dispatch` would."""

    async def record_dispatch(self, lease: Lease, worker_id: str, prompt_id: str) -> Task:
        """Before submitting: remember which worker and prompt id this attempt uses."""

    async def set_phase(
        self, lease: Lease, phase: TaskPhase, progress: dict[str, Any] | None = None
    ) -> Task: ...

    async def set_progress(self, lease: Lease, progress: dict[str, Any]) -> None: ...

    async def renew_leases(self, owner: str, lease_s: float, task_ids: Collection[str]) -> int:
        """Extend the leases of these running tasks, where ``owner`` holds them (the attempts the caller
        really has in hand); return how many. A task ``owner`` holds that is not named is left to expire,
        so that another replica (or this one) adopts it."""

    async def complete_task(
        self, lease: Lease, result: dict[str, Any], progress: dict[str, Any] | None = None
    ) -> Task:
        """End the attempt as completed with ``result``; ``progress``, when given, is the last progress the
        prompt reached, written in the same statement (else the task keeps the one it has)."""

    async def fail_task(
        self, lease: Lease, error: str, kind: str, details: dict[str, Any] | None = None
    ) -> Task: ...

    async def retry_task(
        self,
        lease: Lease,
        not_before: datetime,
        error: str,
        kind: str,
        details: dict[str, Any] | None = None,
    ) -> Task:
        """Back to ``pending`` with ``retry_count + 1``; the attempt is kept in ``attempts``."""

    async def finish_cancelled(self, lease: Lease, reason: str = "cancelled by request") -> Task: ...

    async def release_task(self, lease: Lease) -> Task:
        """Give a claimed task back to ``pending`` without counting a retry (e.g. no worker could take
        it, or shutdown before the prompt was submitted)."""

    async def adopt_expired(
        self, owner: str, lease_s: float, *, limit: int = 100, previous_owner: str | None = None
    ) -> list[Task]:
        """Take over running tasks whose lease expired (their owner died): same prompt, new owner.
        The returned tasks carry the new lease (``attempt`` is bumped so the old owner is fenced out).
        With ``previous_owner``, also take that owner's tasks at once, expired or not (a restarted
        replica with a stable id recovers its own work without waiting for the leases)."""

    async def running_tasks(self, owner: str | None = None) -> list[Task]: ...

    async def next_due_at(self) -> datetime | None:
        """Earliest ``not_before`` among pending tasks that are not runnable yet, for the retry timer."""


class WorkerRecords(Protocol):
    """What the store keeps about each worker."""

    async def upsert_worker(self, worker: Worker) -> Worker: ...
    async def update_worker_activity(self, worker: Worker, *, owner: bool) -> bool:
        """Write only what dispatching changes on a stored worker record (its tasks, last activity, loaded
        models; with ``owner``, the replica that owns the records, also its state and info), not its node
        catalogue. False when there is no such record or it is terminated (nothing written)."""

    async def get_worker(self, worker_id: str) -> Worker: ...
    async def list_workers(self, *, pool: str | None = None, include_gone: bool = False) -> list[Worker]: ...
    async def delete_worker(self, worker_id: str) -> None:
        """Forget a worker; deleting an unknown one is not an error (reconcilers may race)."""

    async def worker_metrics(self) -> WorkerMetrics: ...


class WebhookOutbox(Protocol):
    """A task with a ``webhook`` URL that reaches completed, failed or cancelled gets one delivery row,
    written by the database itself (a trigger) in the transaction that changed the status."""

    async def claim_webhook_deliveries(
        self, owner: str, lease_s: float, *, limit: int = 20
    ) -> list[WebhookDelivery]:
        """Lease up to ``limit`` pending deliveries that are due (and not leased by a live owner) to
        ``owner`` for ``lease_s``, oldest due first. Concurrent claimers never get the same one."""

    async def record_webhook_attempt(
        self,
        delivery_id: int,
        owner: str,
        *,
        outcome: str,
        status_code: int | None,
        error: str | None,
        duration_s: float,
        next_attempt_at: datetime | None = None,
    ) -> WebhookDelivery:
        """Record one attempt by the lease holder ``owner`` (else :class:`StaleLease`): ``outcome``
        ``delivered``, ``retry`` (pending again at ``next_attempt_at``) or ``failed`` (gave up)."""

    async def webhook_deliveries(self, task_id: str) -> list[WebhookDelivery]:
        """The deliveries of one task (none, or one), for showing on the task."""

    async def next_webhook_due_at(self) -> datetime | None:
        """The earliest ``next_attempt_at`` among pending deliveries, for the deliverer's timer."""


class AssetRecords(Protocol):
    """Comfy API v2's assets: blobs (a tenant's uploaded bytes, by blake3 hash, reference-counted), the asset
    records over them or over a job's output files, and the fleet's model files (by folder and name, never
    overwritten, found by sha256)."""

    async def take_blob(self, tenant: str, hash: str) -> Blob | None:
        """One more reference to ``tenant``'s blob of ``hash``, or None when it has none."""

    async def put_blob(self, blob: Blob) -> tuple[Blob, bool]:
        """Store a new blob with one reference, or take one more reference to the one of the same tenant and
        hash stored meanwhile: the blob kept, and whether it is this one (else the caller removes its bytes)."""

    async def drop_blob(self, tenant: str, hash: str) -> Blob | None:
        """One reference fewer; the blob, once the last one went and its record was removed (the caller then
        removes its bytes), else None."""

    async def has_blob(self, tenant: str, hash: str) -> bool: ...

    async def insert_asset(self, asset: Asset) -> Asset | None:
        """Store an asset record (its ``created_at`` is the store's); None when its id exists already."""

    async def insert_assets(self, assets: Sequence[Asset]) -> None:
        """Store the records whose ids do not exist yet (a job's outputs, on first sight)."""

    async def get_asset(self, asset_id: str, tenant: str | None = None) -> Asset:
        """:class:`NotFound` when unknown or another tenant's (``tenant=None`` sees all)."""

    async def delete_asset(self, asset_id: str, tenant: str | None = None) -> Asset:
        """Remove a record and return it (its blob reference is the caller's to drop); :class:`NotFound`."""

    async def put_model_file(self, model: ModelFile) -> tuple[ModelFile, bool]:
        """Record a model file unless its folder and name are taken: the record kept, and whether it is this."""

    async def find_model_file(self, sha256: str) -> ModelFile | None:
        """A model file with this content (the first recorded, when several names have it)."""

    async def list_model_files(self, folder: str | None = None) -> list[ModelFile]:
        """The model files of one folder (all with None), by folder and name."""


class IdempotencyKeys(Protocol):
    """Idempotency keys held apart from the tasks they created, for a limited time (Comfy API v2's
    ``Idempotency-Key``: used once, remembered for a day), so that a key can be used again once it expired."""

    async def claim_idempotency_key(self, tenant: str, key: str, task_id: str, ttl_s: float) -> str | None:
        """Claim ``tenant``'s ``key`` for ``task_id`` (the task about to be created) for ``ttl_s`` seconds:
        None when claimed (also over a claim whose time ran out), else the id of the task that holds it."""

    async def release_idempotency_key(self, tenant: str, key: str, task_id: str) -> None:
        """Give the key up again (the submission it was claimed for created no task); a no-op unless
        ``task_id`` holds it."""

    async def purge_idempotency_keys(self) -> int:
        """Forget the keys whose time ran out; return how many."""


class Coordination(Protocol):
    """The schema, and what keeps replicas in step: wake-ups and leadership."""

    async def migrate(self) -> list[int]:
        """Apply pending numbered migrations; return the versions applied (empty when up to date)."""

    async def is_ready(self) -> bool:
        """The database answers and every migration is applied."""

    async def notify(self, channel: str, payload: str = "") -> None:
        """Wake listeners in every replica (PostgreSQL NOTIFY; in-process for SQLite). Keep ``payload``
        small (PostgreSQL refuses notifications near 8 kB: :class:`InvalidArgument`); send ids, not data.
        The store never notifies on its own: callers say what changed."""

    def listen(self) -> AsyncIterator[Notification]:
        """Every notification from now on, from this replica and the others (each exactly once).
        Registered at once, before the first ``__anext__``. The iterator has ``aclose()`` and is an async
        context manager; it ends when the store closes. Wake-ups can be missed while PostgreSQL is
        unreachable, so a listener keeps a slow safety poll."""

    async def try_leader(self, name: str) -> bool:
        """Hold (or keep holding) a named leadership lock: True in exactly one replica at a time."""

    async def installation_id(self) -> str:
        """This installation's identity: 16 lowercase hex digits made once by the migrations, the same for
        every replica of the store and across restarts, another for every other store (a copy of the
        database is the same installation). The worker manager stamps it on every instance it starts.
        :class:`StoreUnavailable` when the store is not migrated."""


class Store(
    TaskQueue,
    DispatchQueue,
    WorkerRecords,
    WebhookOutbox,
    AssetRecords,
    IdempotencyKeys,
    Coordination,
    Protocol,
):
    """Async, durable state: every role at once. Every long-lived store is an async context manager."""

    url: str

    async def __aenter__(self) -> Self: ...
    async def __aexit__(self, *exc_info: object) -> None: ...
