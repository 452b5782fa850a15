"""Rows to records, written once for every dialect: the column lists both schemas share, the queue order,
and the :class:`Codec` that says how a dialect stores JSON and times."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from comfyfleet.domain import Task, TaskPhase, TaskStatus, Worker, WorkerState
from comfyfleet.store.base import WebhookDelivery

# A row as a driver hands it over: a tuple (sqlite3) or a record (asyncpg), read by position.
Row = Sequence[Any]

# The column lists every statement selects, in the order the readers below unpack (same names in both schemas).
TASK_COLUMNS = (
    "id, seq, tenant, workflow_id, priority, status, phase, payload, created_at, updated_at, worker_id, "
    "started_at, completed_at, result, error, error_kind, error_details, retry_count, max_retries, attempt, "
    "prompt_id, timeout_s, not_before, lease_owner, lease_expires_at, cancel_requested, idempotency_key, "
    "pool, inputs, webhook, metadata, progress, attempts, models"
)
WORKER_COLUMNS = (
    "id, pool, provider, state, created_at, updated_at, endpoint, provider_id, current_task_ids, "
    "last_active_at, health_failures, loaded_models, node_types, error, labels, info"
)
WEBHOOK_COLUMNS = (
    "id, task_id, tenant, url, event, message_id, status, attempts, next_attempt_at, created_at, updated_at, "
    "delivered_at, last_status_code, last_error, history"
)

# The queue order: higher priority first, then submission order (FIFO). Every peek and count uses it, and
# ``queue_order`` is the same order for tasks already read.
QUEUE_ORDER = "priority DESC, seq"


def queue_order(task: Task) -> tuple[int, int]:
    return (-task.priority, task.seq)


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class Codec:
    """How a dialect stores JSON values, lists bound as parameters, and times. PostgreSQL keeps them
    natively (every function is the identity); SQLite keeps them as text."""

    dump_json: Callable[[Any], Any] = _same  # None stays None
    load_json: Callable[[Any], Any] = _same
    dump_list: Callable[[list[Any]], Any] = _same  # a list bound as one parameter
    dump_time: Callable[[datetime], Any] = _same
    load_time: Callable[[Any], datetime] = _same

    def load_optional_time(self, value: Any) -> datetime | None:
        return None if value is None else self.load_time(value)


def task_from_row(row: Row, codec: Codec) -> Task:
    (
        id_,
        seq,
        tenant,
        workflow_id,
        priority,
        status,
        phase,
        payload,
        created_at,
        updated_at,
        worker_id,
        started_at,
        completed_at,
        result,
        error,
        error_kind,
        error_details,
        retry_count,
        max_retries,
        attempt,
        prompt_id,
        timeout_s,
        not_before,
        lease_owner,
        lease_expires_at,
        cancel_requested,
        idempotency_key,
        pool,
        inputs,
        webhook,
        metadata,
        progress,
        attempts,
        models,
    ) = row
    load_json, load_time = codec.load_json, codec.load_optional_time
    return Task(
        id=id_,
        seq=seq,
        tenant=tenant,
        workflow_id=workflow_id,
        priority=priority,
        status=TaskStatus(status),
        phase=TaskPhase(phase) if phase else None,
        payload=load_json(payload) if payload is not None else {},  # None: a list leaves it out
        created_at=codec.load_time(created_at),
        updated_at=codec.load_time(updated_at),
        worker_id=worker_id,
        started_at=load_time(started_at),
        completed_at=load_time(completed_at),
        result=load_json(result),
        error=error,
        error_kind=error_kind,
        error_details=load_json(error_details),
        retry_count=retry_count,
        max_retries=max_retries,
        attempt=attempt,
        prompt_id=prompt_id,
        timeout_s=timeout_s,
        not_before=load_time(not_before),
        lease_owner=lease_owner,
        lease_expires_at=load_time(lease_expires_at),
        cancel_requested=bool(cancel_requested),
        idempotency_key=idempotency_key,
        pool=pool,
        inputs=load_json(inputs),
        webhook=load_json(webhook),
        metadata=load_json(metadata),
        progress=load_json(progress),
        attempts=load_json(attempts),
        models=load_json(models),
    )


def worker_from_row(row: Row, codec: Codec) -> Worker:
    (
        id_,
        pool,
        provider,
        state,
        created_at,
        updated_at,
        endpoint,
        provider_id,
        current_task_ids,
        last_active_at,
        health_failures,
        loaded_models,
        node_types,
        error,
        labels,
        info,
    ) = row
    load_json = codec.load_json
    return Worker(
        id=id_,
        pool=pool,
        provider=provider,
        state=WorkerState(state),
        created_at=codec.load_time(created_at),
        updated_at=codec.load_time(updated_at),
        endpoint=endpoint,
        provider_id=provider_id,
        current_task_ids=load_json(current_task_ids),
        last_active_at=codec.load_optional_time(last_active_at),
        health_failures=health_failures,
        loaded_models=load_json(loaded_models),
        node_types=load_json(node_types),
        error=error,
        labels=load_json(labels),
        info=load_json(info),
    )


def delivery_from_row(row: Row, codec: Codec) -> WebhookDelivery:
    (
        id_,
        task_id,
        tenant,
        url,
        event,
        message_id,
        status,
        attempts,
        next_attempt_at,
        created_at,
        updated_at,
        delivered_at,
        last_status_code,
        last_error,
        history,
    ) = row
    return WebhookDelivery(
        id=id_,
        task_id=task_id,
        tenant=tenant,
        url=url,
        event=event,
        message_id=message_id,
        status=status,
        attempts=attempts,
        next_attempt_at=codec.load_time(next_attempt_at),
        created_at=codec.load_time(created_at),
        updated_at=codec.load_time(updated_at),
        delivered_at=codec.load_optional_time(delivered_at),
        last_status_code=last_status_code,
        last_error=last_error,
        history=codec.load_json(history),
    )
