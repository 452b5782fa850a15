"""The webhook outbox in the store, on both backends: the database writes one delivery when a task with a
webhook ends (whoever ends it), leases it to one deliverer at a time, and keeps every attempt."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from comfyfleet.domain import NewTask, TaskStatus
from comfyfleet.store import Lease, StaleLease, Store
from support import eventually

GRAPH = {"1": {"class_type": "EmptyImage", "inputs": {}}}
HOOK = {"url": "https://hooks.example/comfyfleet"}


async def _claimed(store: Store, **fields: object) -> tuple[str, Lease]:
    task, _ = await store.create_task(NewTask(payload=GRAPH, **fields))  # type: ignore[arg-type]
    [claimed] = await store.claim_ids("dispatcher", 30, [task.id])
    return task.id, Lease(task.id, claimed.attempt, "dispatcher")


async def test_an_ending_writes_exactly_one_delivery(store: Store) -> None:
    completed, lease = await _claimed(store, webhook=HOOK)
    failed, failed_lease = await _claimed(store, webhook=HOOK)
    quiet, quiet_lease = await _claimed(store)
    pending, _ = await store.create_task(NewTask(payload=GRAPH, webhook=HOOK))
    assert await store.webhook_deliveries(completed) == []  # not before the task ends

    await store.complete_task(lease, {"outputs": []})
    await store.fail_task(failed_lease, "boom", "node_error")
    await store.complete_task(quiet_lease, {"outputs": []})
    cancelled = await store.cancel_task(pending.id)
    assert cancelled.status is TaskStatus.CANCELLED

    [delivery] = await store.webhook_deliveries(completed)
    assert delivery.url == HOOK["url"]
    assert delivery.event == "task.completed"
    assert delivery.message_id == f"msg_{completed}"
    assert delivery.status == "pending"
    assert delivery.attempts == 0
    assert [d.event for d in await store.webhook_deliveries(failed)] == ["task.failed"]
    assert [d.event for d in await store.webhook_deliveries(pending.id)] == ["task.cancelled"]
    assert await store.webhook_deliveries(quiet) == []
    assert await store.next_webhook_due_at() is not None


async def test_deliveries_are_leased_retried_and_finished(store: Store) -> None:
    task_id, lease = await _claimed(store, webhook=HOOK)
    await store.complete_task(lease, {"outputs": []})

    [mine] = await store.claim_webhook_deliveries("replica-a", 30)
    assert await store.claim_webhook_deliveries("replica-b", 30) == []  # leased: nobody else gets it
    later = datetime.now(UTC) + timedelta(milliseconds=300)
    retried = await store.record_webhook_attempt(
        mine.id,
        "replica-a",
        outcome="retry",
        status_code=503,
        error="HTTP 503",
        duration_s=0.01,
        next_attempt_at=later,
    )
    assert retried.status == "pending"
    assert retried.attempts == 1
    assert retried.last_status_code == 503
    assert await store.claim_webhook_deliveries("replica-b", 30) == []  # not due yet
    with pytest.raises(StaleLease):  # the lease ended with the attempt
        await store.record_webhook_attempt(
            mine.id, "replica-a", outcome="delivered", status_code=200, error=None, duration_s=0
        )

    [again] = await eventually(lambda: store.claim_webhook_deliveries("replica-b", 30), within=5)
    done = await store.record_webhook_attempt(
        again.id, "replica-b", outcome="delivered", status_code=204, error=None, duration_s=0.02
    )
    assert done.status == "delivered"
    assert done.delivered_at is not None
    [shown] = await store.webhook_deliveries(task_id)
    assert [entry["status_code"] for entry in shown.history] == [503, 204]
    assert [entry["attempt"] for entry in shown.history] == [1, 2]
    assert await store.claim_webhook_deliveries("replica-c", 30) == []
    assert await store.next_webhook_due_at() is None


async def test_an_expired_lease_lets_another_deliverer_take_over(store: Store) -> None:
    _, lease = await _claimed(store, webhook=HOOK)
    await store.complete_task(lease, {"outputs": []})
    [first] = await store.claim_webhook_deliveries("dead-replica", 0.05)

    [second] = await eventually(lambda: store.claim_webhook_deliveries("live-replica", 30), within=5)
    assert second.id == first.id
    with pytest.raises(StaleLease):
        await store.record_webhook_attempt(
            first.id, "dead-replica", outcome="delivered", status_code=200, error=None, duration_s=0
        )
    gave_up = await store.record_webhook_attempt(
        second.id, "live-replica", outcome="failed", status_code=None, error="refused", duration_s=0
    )
    assert gave_up.status == "failed"
