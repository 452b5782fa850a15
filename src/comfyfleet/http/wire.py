"""The wire form of a task and of what hangs off it, shared by every part of the HTTP edge.

``GET /api/v1/tasks/{id}`` answers with :func:`task_json`, and a webhook carries the same form as its
``data``; the models of ``comfyfleet.api.schemas`` describe it for the OpenAPI document. Plain dicts,
serialized once by pydantic-core (cheaper than validating a response model per request).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from comfyfleet.domain import QueueMetrics, Task
from comfyfleet.store import WebhookDelivery


def utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # the store's times are UTC; a naive one is read as UTC, never as local time
        return moment.replace(tzinfo=UTC)
    offset = moment.utcoffset()
    return moment if offset is not None and not offset else moment.astimezone(UTC)


def _input_summaries(inputs: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Inputs without their base64 bytes: a task read back must not carry megabytes it was sent."""
    if inputs is None:
        return None
    summaries = []
    for spec in inputs:
        summary = {key: value for key, value in spec.items() if key != "data"}
        if isinstance(spec.get("data"), str):
            summary["size"] = len(spec["data"]) * 3 // 4 - spec["data"][-2:].count("=")
        summaries.append(summary)
    return summaries


def _redacted_webhook(webhook: dict[str, Any] | None) -> dict[str, Any] | None:
    if webhook is None or "secret" not in webhook:
        return webhook
    return {**webhook, "secret": "********"}


def task_json(
    task: Task,
    queue_position: int | None = None,
    estimated_start_s: float | None = None,
    *,
    include_payload: bool = True,
) -> dict[str, Any]:
    """The wire form of a task (see :class:`TaskOut`); lists leave the ``payload`` out unless asked."""
    body = {
        "id": task.id,
        "workflow_id": task.workflow_id,
        "priority": task.priority,
        "status": task.status.value,
        "payload": task.payload,
        "worker_id": task.worker_id,
        "created_at": utc(task.created_at),
        "started_at": utc(task.started_at),
        "completed_at": utc(task.completed_at),
        "result": task.result,
        "error": task.error,
        "retry_count": task.retry_count,
        "max_retries": task.max_retries,
        "phase": task.phase.value if task.phase is not None else None,
        "attempt": task.attempt,
        "prompt_id": task.prompt_id,
        "timeout_s": task.timeout_s,
        "not_before": utc(task.not_before),
        "tenant": task.tenant,
        "updated_at": utc(task.updated_at),
        "pool": task.pool,
        "progress": task.progress,
        "attempts": task.attempts,
        "error_kind": task.error_kind,
        "error_details": task.error_details,
        "cancel_requested": task.cancel_requested,
        "idempotency_key": task.idempotency_key,
        "models": task.models,
        "inputs": _input_summaries(task.inputs),
        "webhook": _redacted_webhook(task.webhook),
        "metadata": task.metadata,
        "queue_position": queue_position,
        "estimated_start_s": estimated_start_s,
    }
    if not include_payload:
        del body["payload"]
    return body


def queue_metrics_json(metrics: QueueMetrics) -> dict[str, Any]:
    return {
        "pending_tasks": metrics.pending_tasks,
        "running_tasks": metrics.running_tasks,
        "completed_tasks": metrics.completed_tasks,
        "failed_tasks": metrics.failed_tasks,
        "cancelled_tasks": metrics.cancelled_tasks,
        "oldest_pending_age_s": metrics.oldest_pending_age_s,
    }


def delivery_json(delivery: WebhookDelivery) -> dict[str, Any]:
    """How a webhook delivery is shown on its task (``webhook_deliveries``)."""
    return {
        "url": delivery.url,
        "event": delivery.event,
        "message_id": delivery.message_id,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": delivery.next_attempt_at if delivery.status == "pending" else None,
        "delivered_at": delivery.delivered_at,
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "history": delivery.history,
    }
