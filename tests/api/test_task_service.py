"""The task service on its own, over a real SQLite store: the idempotency behaviours a front door can ask
for, the events and wake-ups it sends, and its refusals as typed errors."""

from __future__ import annotations

from typing import Any

import pytest
from api_helpers import small_body

from comfyfleet.config import PoolConfig, Settings
from comfyfleet.domain import TaskStatus
from comfyfleet.events import CANCEL_CHANNEL, TASKS_CHANNEL, EventBus
from comfyfleet.store import Store
from comfyfleet.tasks import (
    CancelTask,
    ChangePriority,
    Idempotency,
    IdempotencyConflict,
    OnReuse,
    Rejected,
    SubmitTask,
    TaskNotFound,
    TaskService,
    TaskStateConflict,
)


def command(tenant: str = "alice", idempotency: Idempotency | None = None, **fields: Any) -> SubmitTask:
    return SubmitTask(payload=small_body()["payload"], tenant=tenant, idempotency=idempotency, **fields)


@pytest.fixture
def service(sqlite_store: Store, sqlite_url: str) -> TaskService:
    settings = Settings(store=sqlite_url, pools=[PoolConfig(name="gpu")])
    return TaskService(settings, sqlite_store, bus=EventBus(sqlite_store))


async def test_a_key_replayed_only_for_the_same_request(service: TaskService) -> None:
    key = Idempotency("order-1", OnReuse.REPLAY_SAME_REQUEST)
    first = await service.submit(command(idempotency=key, priority=1))
    again = await service.submit(command(idempotency=key, priority=1))
    assert (first.created, again.created) == (True, False)
    assert again.task.id == first.task.id
    with pytest.raises(IdempotencyConflict) as refused:
        await service.submit(command(idempotency=key, priority=2))
    assert refused.value.code == "idempotency_key_reused"
    assert refused.value.task_id == first.task.id
    # Keys are per tenant.
    other = await service.submit(command(tenant="bob", idempotency=key, priority=2))
    assert other.created


async def test_a_single_use_key_is_refused_even_for_the_same_request(service: TaskService) -> None:
    key = Idempotency("job-1", OnReuse.REFUSE)
    first = await service.submit(command(idempotency=key))
    with pytest.raises(IdempotencyConflict) as refused:
        await service.submit(command(idempotency=key))
    assert refused.value.task_id == first.task.id
    assert "use a new key" in refused.value.message


async def test_a_key_naming_the_task_replays_whatever_was_sent_and_is_private_to_its_tenant(
    service: TaskService, sqlite_store: Store
) -> None:
    task_id = "5b0f5a2e-2c1e-4d59-9a43-0b8e0f7f8c11"
    key = Idempotency(task_id, OnReuse.REPLAY, names_task=True)
    first = await service.submit(command(idempotency=key, priority=1))
    assert first.task.id == task_id
    assert first.task.idempotency_key is None  # the id itself is the key
    again = await service.submit(command(idempotency=key, priority=5))
    assert (again.created, again.task.priority) == (False, 1)
    with pytest.raises(IdempotencyConflict) as refused:
        await service.submit(command(tenant="bob", idempotency=key))
    assert refused.value.code == "task_id_in_use"
    assert refused.value.task_id is None  # bob is not told which task holds it
    assert (await sqlite_store.queue_metrics()).pending_tasks == 1


async def test_a_submission_is_announced_and_wakes_the_dispatcher(
    sqlite_store: Store, sqlite_url: str
) -> None:
    bus = EventBus(sqlite_store)
    service = TaskService(Settings(store=sqlite_url), sqlite_store, bus=bus)
    with bus.subscribe() as events:
        async with sqlite_store.listen() as notifications:
            submitted = await service.submit(command(front=True, priority=3))
            note = await anext(notifications)
        event = await events.get(wait_s=5)
    assert submitted.task.priority == 4  # "front": one level up
    assert note.channel == TASKS_CHANNEL
    assert submitted.task.id in note.payload
    assert event is not None
    assert (event.type, event.task_id, event.data["status"]) == ("status", submitted.task.id, "pending")


async def test_refusals_are_typed_with_their_code_and_location(service: TaskService) -> None:
    with pytest.raises(Rejected) as unknown_pool:
        await service.submit(command(pool="cpu"))
    assert unknown_pool.value.code == "unknown_pool"
    assert unknown_pool.value.problems[0].location == ("pool",)
    with pytest.raises(Rejected) as bad_input:
        await service.submit(command(inputs=[{"name": "a.png", "data": "not base64!"}]))
    assert (bad_input.value.code, bad_input.value.problems[0].location) == ("invalid_input", ("inputs", 0))
    with pytest.raises(Rejected) as bad_graph:
        await service.submit(SubmitTask(payload={"1": {"inputs": {}}}, tenant="alice"))
    assert bad_graph.value.code == "invalid_graph"
    assert bad_graph.value.problems[0].location == ("payload", "1")


async def test_cancel_and_priority_refusals(service: TaskService, sqlite_store: Store) -> None:
    task = (await service.submit(command())).task
    moved = await service.change_priority(ChangePriority(task.id, 7, tenant=None))
    assert moved.priority == 7
    with pytest.raises(TaskNotFound):
        await service.cancel(CancelTask(task.id, tenant="bob"))
    cancelled = await service.cancel(CancelTask(task.id, tenant="alice"))
    assert cancelled.status is TaskStatus.CANCELLED
    with pytest.raises(TaskStateConflict):
        await service.cancel(CancelTask(task.id, tenant="alice"))
    with pytest.raises(TaskStateConflict):
        await service.change_priority(ChangePriority(task.id, 1, tenant=None))

    running = (await service.submit(command())).task
    [claimed] = await sqlite_store.claim_ids("test-dispatcher", 30.0, [running.id])
    assert claimed.id == running.id
    async with sqlite_store.listen() as notifications:
        stopping = await service.cancel(CancelTask(running.id, tenant=None))
        note = await anext(notifications)
    assert (stopping.status, stopping.cancel_requested) == (TaskStatus.RUNNING, True)
    assert (note.channel, note.payload) == (CANCEL_CHANNEL, running.id)
