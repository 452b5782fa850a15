"""The behavioural contract of the store: every test here runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import random
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from comfyfleet.domain import NewTask, Task, TaskPhase, TaskStatus, Worker, WorkerState
from comfyfleet.store import (
    Conflict,
    InvalidArgument,
    Lease,
    NotFound,
    StaleLease,
    Store,
    StoreUnavailable,
    cursor_after,
    open_store,
)

PAYLOAD: dict[str, Any] = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "model": ["4", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "model.safetensors"}},
}


def new(priority: int = 0, **fields: Any) -> NewTask:
    return NewTask(payload=PAYLOAD, priority=priority, **fields)


def lease_of(task: Any) -> Lease:
    assert task.lease_owner is not None
    return Lease(task.id, task.attempt, task.lease_owner)


def claim_order(tasks: list[Any]) -> list[str]:
    return [task.id for task in sorted(tasks, key=lambda task: (-task.priority, task.seq))]


async def claim_next(
    store: Store, owner: str, lease_s: float, *, limit: int = 1, pools: Any = None
) -> list[Task]:
    """Claim the head of the queue the way the dispatcher does: peek, then claim exactly what was seen."""
    head = await store.peek_pending(limit=limit, pools=pools)
    return await store.claim_ids(owner, lease_s, [task.id for task in head])


async def test_create_task_assigns_ids_order_and_utc_times(store: Store) -> None:
    before = datetime.now(UTC)
    first, created = await store.create_task(
        new(
            3,
            workflow_id="wf",
            tenant="acme",
            pool="gpu",
            inputs=[{"name": "a.png"}],
            webhook={"url": "http://hook"},
            metadata={"k": "v"},
            max_retries=5,
            timeout_s=60.0,
        )
    )
    second, _ = await store.create_task(new())
    assert created
    assert uuid.UUID(first.id).version == 4
    assert second.seq > first.seq
    assert first.status is TaskStatus.PENDING
    assert first.attempt == 0
    assert first.retry_count == 0
    assert first.created_at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=5) <= first.created_at <= datetime.now(UTC) + timedelta(seconds=5)

    stored = await store.get_task(first.id)
    assert stored.payload == PAYLOAD
    assert (stored.workflow_id, stored.priority, stored.tenant, stored.pool) == ("wf", 3, "acme", "gpu")
    assert (stored.inputs, stored.webhook, stored.metadata) == (
        [{"name": "a.png"}],
        {"url": "http://hook"},
        {"k": "v"},
    )
    assert (stored.max_retries, stored.timeout_s) == (5, 60.0)
    assert stored.created_at == first.created_at
    assert stored.seq == first.seq
    assert stored.started_at is None
    assert stored.completed_at is None
    assert stored.attempts == []


async def test_a_caller_chosen_id_is_kept_and_never_reused(store: Store) -> None:
    chosen = str(uuid.uuid4())
    task, created = await store.create_task(new(id=chosen))
    assert created
    assert task.id == chosen
    assert (await store.get_task(chosen)).seq == task.seq
    with pytest.raises(Conflict):
        await store.create_task(new(id=chosen, tenant="another"))
    assert (await store.queue_metrics()).pending_tasks == 1


async def test_get_task_hides_other_tenants(store: Store) -> None:
    task, _ = await store.create_task(new(tenant="alice"))
    assert (await store.get_task(task.id, tenant="alice")).id == task.id
    with pytest.raises(NotFound):
        await store.get_task(task.id, tenant="bob")
    with pytest.raises(NotFound):
        await store.get_task(str(uuid.uuid4()))


async def test_task_status_is_the_light_read_of_get_task(store: Store) -> None:
    task, _ = await store.create_task(new(tenant="alice"))
    assert await store.task_status(task.id, tenant="alice") is TaskStatus.PENDING
    assert await store.task_status(task.id) is TaskStatus.PENDING
    assert await store.task_status(task.id, tenant="bob") is None  # as get_task: another tenant's is unknown
    assert await store.task_status(str(uuid.uuid4())) is None
    await store.claim_ids("d", 30, [task.id])
    assert await store.task_status(task.id, tenant="alice") is TaskStatus.RUNNING


async def test_idempotency_key_returns_the_original_task(store: Store) -> None:
    original, created = await store.create_task(new(1, idempotency_key="k1", tenant="alice"))
    again, created_again = await store.create_task(new(9, idempotency_key="k1", tenant="alice"))
    other_tenant, created_other = await store.create_task(new(idempotency_key="k1", tenant="bob"))
    assert created
    assert not created_again
    assert created_other
    assert again.id == original.id
    assert again.priority == 1
    assert other_tenant.id != original.id


async def test_idempotency_holds_under_concurrent_submissions(store: Store) -> None:
    results = await asyncio.gather(*(store.create_task(new(idempotency_key="same")) for _ in range(25)))
    assert sum(created for _, created in results) == 1
    assert len({task.id for task, _ in results}) == 1
    assert (await store.queue_metrics()).pending_tasks == 1


async def test_priority_then_fifo_for_queue_position_peeks_and_claims(store: Store) -> None:
    rng = random.Random(20240501)
    tasks = [(await store.create_task(new(rng.randint(-2, 3))))[0] for _ in range(100)]
    expected = claim_order(tasks)
    positions = {task.id: await store.queue_position(task.id) for task in tasks}
    assert sorted(positions, key=lambda task_id: positions[task_id]) == expected
    assert sorted(positions.values()) == list(range(1, 101))
    assert [task.id for task in await store.peek_pending(limit=100)] == expected

    # The dispatcher's path: peek at the head, then claim what it placed (here a random part of the window,
    # as placement may leave some tasks for later); what it left stays first in line.
    claimed: list[str] = []
    while len(claimed) < 100:
        window = await store.peek_pending(limit=rng.randint(1, 7))
        assert [task.id for task in window] == expected[len(claimed) : len(claimed) + len(window)]
        placed = window[: rng.randint(1, len(window))]
        batch = await store.claim_ids("dispatcher", 60, [task.id for task in reversed(placed)])
        assert [task.id for task in batch] == [task.id for task in placed], "claim_ids returns claim order"
        claimed.extend(task.id for task in batch)
    assert claimed == expected
    assert await store.peek_pending(limit=10) == []
    assert await store.claim_ids("dispatcher", 60, expected[:3]) == []


async def test_concurrent_claimers_never_share_or_skip_a_task(store: Store) -> None:
    rng = random.Random(7)
    tasks = [(await store.create_task(new(rng.randint(0, 3))))[0] for _ in range(120)]
    rank = {task_id: place for place, task_id in enumerate(claim_order(tasks))}

    async def claimer(owner: str, seed: int) -> list[str]:
        own_rng = random.Random(seed)
        taken: list[str] = []
        while head := await store.peek_pending(limit=own_rng.randint(1, 8)):
            batch = await store.claim_ids(owner, 60, [task.id for task in head])
            assert all(task.lease_owner == owner and task.attempt == 1 for task in batch)
            taken.extend(task.id for task in batch)
        return taken

    results = await asyncio.gather(*(claimer(f"claimer-{n}", n) for n in range(4)))
    every = [task_id for taken in results for task_id in taken]
    assert len(every) == len(set(every)), "a task was claimed twice"
    assert set(every) == set(rank), "a task was left behind"
    for taken in results:
        # Each claimer only ever moves down the queue: a task it skipped would show up out of order.
        assert [rank[task_id] for task_id in taken] == sorted(rank[task_id] for task_id in taken)
    assert (await store.queue_metrics()).running_tasks == 120


async def test_peek_per_tenant_reads_the_head_of_every_tenants_queue(store: Store) -> None:
    crowd = [(await store.create_task(new(0, tenant="crowd", pool="gpu")))[0] for _ in range(30)]
    urgent, _ = await store.create_task(new(5, tenant="crowd", pool="gpu"))
    lone, _ = await store.create_task(new(0, tenant="lone", pool="gpu"))
    other_pool, _ = await store.create_task(new(0, tenant="third", pool="cpu"))
    later, _ = await store.create_task(new(0, tenant="later", pool="gpu"))
    [retried] = await store.claim_ids("d", 30, [later.id])
    await store.retry_task(lease_of(retried), datetime.now(UTC) + timedelta(hours=1), "lost", "worker_lost")

    heads = await store.peek_pending_per_tenant(limit=3, pools={"gpu"})
    # Each tenant's first three runnable tasks (the lone tenant's one is not buried under the crowd's 30),
    # all in claim order; another pool and a task not due yet are left out.
    assert [task.id for task in heads] == [urgent.id, crowd[0].id, crowd[1].id, lone.id]
    assert {task.id for task in await store.peek_pending_per_tenant(limit=1)} == {
        urgent.id,
        lone.id,
        other_pool.id,
    }
    assert await store.peek_pending_per_tenant(limit=0) == []
    assert await store.peek_pending_per_tenant(limit=5, pools=set()) == []
    assert later.id not in {task.id for task in await store.peek_pending_per_tenant(limit=50)}

    assert await store.running_per_tenant() == {}
    await store.claim_ids("d", 30, [crowd[0].id, crowd[1].id, lone.id])
    assert await store.running_per_tenant() == {"crowd": 2, "lone": 1}


async def test_claim_starts_an_attempt(store: Store) -> None:
    task, _ = await store.create_task(new())
    [claimed] = await claim_next(store, "d1", 30)
    assert claimed.id == task.id
    assert claimed.status is TaskStatus.RUNNING
    assert claimed.phase is TaskPhase.DISPATCHING
    assert claimed.attempt == 1
    assert claimed.lease_owner == "d1"
    assert claimed.started_at is not None
    assert claimed.lease_expires_at is not None
    assert timedelta(seconds=25) < claimed.lease_expires_at - claimed.started_at <= timedelta(seconds=31)
    assert await store.queue_position(task.id) is None
    assert [running.id for running in await store.running_tasks("d1")] == [task.id]
    assert await store.running_tasks("d2") == []


async def test_claim_filters_pools_and_skips_tasks_not_due(store: Store) -> None:
    gpu, _ = await store.create_task(new(pool="gpu"))
    plain, _ = await store.create_task(new())
    assert await claim_next(store, "d", 30, pools=[]) == []
    assert [task.id for task in await claim_next(store, "d", 30, pools=["gpu"])] == [gpu.id]
    assert [task.id for task in await claim_next(store, "d", 30, pools=["gpu", None])] == [plain.id]

    later, _ = await store.create_task(new(5))
    [running] = await claim_next(store, "d", 30)
    assert running.id == later.id
    await store.retry_task(lease_of(running), datetime.now(UTC) + timedelta(hours=1), "lost", "worker_lost")
    assert await claim_next(store, "d", 30) == []
    assert (await store.demand_by_pool()) == {"gpu": (0, 1), None: (0, 1)}


async def test_peek_pending_and_claim_ids(store: Store) -> None:
    low, _ = await store.create_task(new(0))
    high, _ = await store.create_task(new(2))
    peeked = await store.peek_pending(limit=5)
    assert [task.id for task in peeked] == [high.id, low.id]
    assert all(task.status is TaskStatus.PENDING for task in peeked)
    claimed = await store.claim_ids("d", 30, [low.id, str(uuid.uuid4())])
    assert [task.id for task in claimed] == [low.id]
    assert claimed[0].attempt == 1
    assert await store.claim_ids("d", 30, [low.id]) == []  # already running
    assert [task.id for task in await store.peek_pending(limit=5)] == [high.id]


async def test_a_claim_can_record_the_dispatch_of_each_task(store: Store) -> None:
    first, _ = await store.create_task(new(1))
    second, _ = await store.create_task(new(0))
    plain, _ = await store.create_task(new(0))
    assigned = {second.id: ("w2", "prompt-2"), first.id: ("w1", "prompt-1")}
    claimed = await store.claim_ids("d", 30, [first.id, second.id], assigned)
    assert [(task.id, task.worker_id, task.prompt_id) for task in claimed] == [
        (first.id, "w1", "prompt-1"),
        (second.id, "w2", "prompt-2"),
    ]
    assert all(task.phase is TaskPhase.DISPATCHING and task.attempt == 1 for task in claimed)
    stored = await store.get_task(second.id)
    assert (stored.worker_id, stored.prompt_id) == ("w2", "prompt-2")
    [again] = await store.claim_ids("d", 30, [plain.id])  # without: nothing recorded yet
    assert (again.worker_id, again.prompt_id) == (None, None)


async def test_writes_are_fenced_by_the_lease(store: Store) -> None:
    task, _ = await store.create_task(new())
    [claimed] = await claim_next(store, "d1", 30)
    lease = lease_of(claimed)
    with pytest.raises(StaleLease):
        await store.record_dispatch(Lease(task.id, lease.attempt + 1, "d1"), "w1", "p1")
    with pytest.raises(StaleLease):
        await store.set_phase(Lease(task.id, lease.attempt, "someone-else"), TaskPhase.EXECUTING)
    with pytest.raises(NotFound):
        await store.complete_task(Lease(str(uuid.uuid4()), 1, "d1"), {})
    dispatched = await store.record_dispatch(lease, "w1", "p1")
    assert (dispatched.worker_id, dispatched.prompt_id) == ("w1", "p1")
    executing = await store.set_phase(lease, TaskPhase.EXECUTING, {"node": "3"})
    assert executing.phase is TaskPhase.EXECUTING
    assert executing.progress == {"node": "3"}
    await store.set_progress(lease, {"node": "3", "value": 5, "max": 20})
    assert (await store.get_task(task.id)).progress == {"node": "3", "value": 5, "max": 20}
    await store.complete_task(lease, {"images": []})
    for stale_write in (
        store.set_progress(lease, {}),
        store.fail_task(lease, "late", "x"),
        store.retry_task(lease, datetime.now(UTC), "late", "x"),
        store.release_task(lease),
        store.finish_cancelled(lease),
    ):
        with pytest.raises(StaleLease):
            await stale_write
    assert (await store.get_task(task.id)).status is TaskStatus.COMPLETED


async def test_expired_leases_are_adopted_with_the_same_prompt(store: Store) -> None:
    task, _ = await store.create_task(new())
    [claimed] = await claim_next(store, "dead", 0)  # expires at once: its owner stops renewing
    old_lease = lease_of(claimed)
    await store.record_dispatch(old_lease, "w1", "prompt-1")
    [adopted] = await store.adopt_expired("alive", 30)
    assert adopted.id == task.id
    assert adopted.lease_owner == "alive"
    assert adopted.attempt == old_lease.attempt + 1
    assert (adopted.worker_id, adopted.prompt_id) == ("w1", "prompt-1")
    assert adopted.status is TaskStatus.RUNNING
    with pytest.raises(StaleLease):
        await store.complete_task(old_lease, {})
    assert await store.adopt_expired("third", 30) == []  # the new lease is current
    assert await store.renew_leases("alive", 30, [task.id]) == 1
    assert await store.renew_leases("dead", 30, [task.id]) == 0
    done = await store.complete_task(lease_of(adopted), {"ok": True})
    assert done.status is TaskStatus.COMPLETED
    assert done.result == {"ok": True}


async def test_renewing_only_the_attempts_in_hand_lets_the_others_expire(store: Store) -> None:
    for _ in range(3):
        await store.create_task(new())
    held, lost, finished = await claim_next(store, "replica-a", 0, limit=3)  # leases expired already
    await store.complete_task(lease_of(finished), {})
    unknown = str(uuid.uuid4())
    # The replica still holds one attempt in memory; it lost the other (say, to a store error mid-attempt).
    assert await store.renew_leases("replica-a", 600, [held.id, held.id, finished.id, unknown]) == 1
    assert await store.renew_leases("replica-b", 600, [held.id, lost.id]) == 0  # not its leases
    assert await store.renew_leases("replica-a", 600, []) == 0
    renewed = await store.get_task(held.id)
    assert renewed.lease_expires_at is not None
    assert renewed.lease_expires_at > datetime.now(UTC) + timedelta(seconds=500)
    assert (await store.get_task(lost.id)).lease_expires_at == lost.lease_expires_at

    [adopted] = await store.adopt_expired("replica-b", 600)
    assert (adopted.id, adopted.lease_owner, adopted.attempt) == (lost.id, "replica-b", lost.attempt + 1)
    assert await store.renew_leases("replica-a", 600, [held.id, lost.id]) == 1  # the adopted one is gone
    await store.complete_task(lease_of(held), {})
    with pytest.raises(StaleLease):
        await store.complete_task(lease_of(lost), {})


async def test_adopt_takes_a_previous_owners_tasks_at_once(store: Store) -> None:
    await store.create_task(new())
    await store.create_task(new())
    first, second = await claim_next(store, "replica-a", 600, limit=2)
    assert await store.adopt_expired("replica-b", 600) == []
    adopted = await store.adopt_expired("replica-a", 600, previous_owner="replica-a")
    assert sorted(task.id for task in adopted) == sorted([first.id, second.id])
    assert all(task.attempt == 2 and task.lease_owner == "replica-a" for task in adopted)


async def test_retry_records_the_attempt_and_waits_for_not_before(store: Store) -> None:
    task, _ = await store.create_task(new())
    [claimed] = await claim_next(store, "d", 30)
    await store.record_dispatch(lease_of(claimed), "w1", "p1")
    due = datetime.now(UTC) + timedelta(hours=1)
    retried = await store.retry_task(lease_of(claimed), due, "worker went away", "worker_lost", {"code": 1})
    assert retried.status is TaskStatus.PENDING
    assert retried.retry_count == 1
    assert retried.not_before == due
    assert (retried.phase, retried.worker_id, retried.prompt_id, retried.lease_owner) == (
        None,
        None,
        None,
        None,
    )
    assert (retried.error, retried.error_kind, retried.error_details) == (
        "worker went away",
        "worker_lost",
        {"code": 1},
    )
    [attempt] = retried.attempts
    assert attempt["attempt"] == 1
    assert attempt["outcome"] == "retry"
    assert (attempt["worker_id"], attempt["prompt_id"], attempt["error"], attempt["kind"]) == (
        "w1",
        "p1",
        "worker went away",
        "worker_lost",
    )
    assert datetime.fromisoformat(attempt["started_at"]) <= datetime.fromisoformat(attempt["ended_at"])
    assert retried.started_at == claimed.started_at

    assert await claim_next(store, "d", 30) == []
    assert await store.next_due_at() == due
    assert await store.queue_position(task.id) == 1  # its place once due: nothing runnable is ahead
    _newer, _ = await store.create_task(new())
    assert await store.queue_position(task.id) == 1  # FIFO among runnable tasks once due: it is older


async def test_retry_once_due_starts_the_next_attempt(store: Store) -> None:
    await store.create_task(new())
    [claimed] = await claim_next(store, "d", 30)
    await store.retry_task(
        lease_of(claimed), datetime.now(UTC) - timedelta(seconds=1), "oom", "out_of_memory"
    )
    assert await store.next_due_at() is None
    [again] = await claim_next(store, "d", 30)
    assert again.attempt == 2
    assert again.retry_count == 1
    failed = await store.fail_task(lease_of(again), "oom again", "out_of_memory", {"vram": 1})
    assert failed.status is TaskStatus.FAILED
    assert failed.completed_at is not None
    assert [entry["outcome"] for entry in failed.attempts] == ["retry", "failed"]
    assert [entry["attempt"] for entry in failed.attempts] == [1, 2]


async def test_release_gives_the_task_back_without_a_retry(store: Store) -> None:
    first, _ = await store.create_task(new())
    second, _ = await store.create_task(new())
    [claimed] = await claim_next(store, "d", 30)
    released = await store.release_task(lease_of(claimed))
    assert released.status is TaskStatus.PENDING
    assert released.retry_count == 0
    assert released.attempts == []
    assert released.lease_owner is None
    assert released.started_at is None
    assert await store.queue_position(first.id) == 1
    assert await store.queue_position(second.id) == 2
    with pytest.raises(StaleLease):
        await store.record_dispatch(lease_of(claimed), "w", "p")
    [again] = await claim_next(store, "d", 30)
    assert again.id == first.id
    assert again.attempt == 2


async def test_cancel_pending_running_and_finished_tasks(store: Store) -> None:
    pending, _ = await store.create_task(new(tenant="alice"))
    cancelled = await store.cancel_task(pending.id, tenant="alice")
    assert cancelled.status is TaskStatus.CANCELLED
    assert cancelled.completed_at is not None
    with pytest.raises(Conflict):
        await store.cancel_task(pending.id)

    running, _ = await store.create_task(new(tenant="alice"))
    [claimed] = await claim_next(store, "d", 30)
    with pytest.raises(NotFound):
        await store.cancel_task(running.id, tenant="bob")
    with pytest.raises(NotFound):
        await store.cancel_task(str(uuid.uuid4()))
    requested = await store.cancel_task(running.id)
    assert requested.status is TaskStatus.RUNNING
    assert requested.cancel_requested
    assert (await store.cancel_task(running.id)).cancel_requested  # asking twice is harmless
    finished = await store.finish_cancelled(lease_of(claimed), "stopped on request")
    assert finished.status is TaskStatus.CANCELLED
    assert finished.error == "stopped on request"
    assert finished.completed_at is not None
    assert [entry["outcome"] for entry in finished.attempts] == ["cancelled"]
    with pytest.raises(Conflict):
        await store.cancel_task(running.id)


async def test_a_pending_tasks_priority_moves_it_in_the_queue(store: Store) -> None:
    first, second, third = [(await store.create_task(new(0, tenant="alice")))[0] for _ in range(3)]
    assert await store.queue_position(third.id) == 3
    raised = await store.set_priority(third.id, 5, tenant="alice")
    assert (raised.priority, raised.status) == (5, TaskStatus.PENDING)
    assert raised.updated_at >= third.updated_at
    assert [await store.queue_position(t.id) for t in (third, first, second)] == [1, 2, 3]
    # Back to the old priority: its submission order among equals is what it was.
    await store.set_priority(third.id, 0)
    assert [await store.queue_position(t.id) for t in (first, second, third)] == [1, 2, 3]
    await store.set_priority(second.id, -1)
    assert [task.id for task in await claim_next(store, "d", 30, limit=3)] == [first.id, third.id, second.id]

    with pytest.raises(Conflict, match="only a pending task"):
        await store.set_priority(first.id, 9)  # running now
    with pytest.raises(NotFound):
        await store.set_priority(str(uuid.uuid4()), 1)
    waiting, _ = await store.create_task(new(0, tenant="alice"))
    with pytest.raises(NotFound):
        await store.set_priority(waiting.id, 1, tenant="bob")
    assert (await store.get_task(waiting.id)).priority == 0


async def test_a_requested_cancel_wins_over_retry_and_release(store: Store) -> None:
    for give_back in ("retry", "release"):
        task, _ = await store.create_task(new())
        [claimed] = await claim_next(store, "d", 30)
        await store.cancel_task(task.id)
        if give_back == "retry":
            ended = await store.retry_task(lease_of(claimed), datetime.now(UTC), "lost", "worker_lost")
        else:
            ended = await store.release_task(lease_of(claimed))
        assert ended.status is TaskStatus.CANCELLED, give_back
    assert await claim_next(store, "d", 30) == []


async def test_list_tasks_pages_newest_first_with_filters(store: Store) -> None:
    created = [
        (await store.create_task(new(workflow_id="a" if i % 2 else "b", tenant="t")))[0] for i in range(7)
    ]
    await store.create_task(new(tenant="other"))
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await store.list_tasks(tenant="t", limit=3, cursor=cursor)
        seen.extend(task.id for task in page.tasks)
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [task.id for task in reversed(created)]
    assert pages == 3
    only_a = await store.list_tasks(workflow_id="a", tenant="t")
    assert [task.id for task in only_a.tasks] == [
        task.id for task in reversed(created) if task.workflow_id == "a"
    ]
    await store.cancel_task(created[0].id)
    cancelled = await store.list_tasks(statuses=[TaskStatus.CANCELLED])
    assert [task.id for task in cancelled.tasks] == [created[0].id]
    assert cancelled.next_cursor is None
    assert (await store.list_tasks(statuses=[])).tasks == []
    with pytest.raises(InvalidArgument):
        await store.list_tasks(cursor="not-a-cursor")
    with pytest.raises(InvalidArgument):
        await store.list_tasks(limit=0)


async def test_lists_leave_out_payloads_and_input_bytes(store: Store) -> None:
    data = base64.b64encode(b"\x89PNG" + bytes(range(256)) * 40).decode()  # 10,244 bytes, one "=" of padding
    inputs = [
        {"name": "a.png", "data": data},
        {"name": "b.png", "url": "https://example.com/b.png", "sha256": "ab" * 32},
        {"name": "c.bin", "data": base64.b64encode(b"xy").decode()},  # "eHk=": 2 bytes
    ]
    payload = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png", "text": "é" * 1000}}}
    task, _ = await store.create_task(NewTask(payload=payload, inputs=inputs, tenant="t", metadata={"k": 1}))
    await store.create_task(NewTask(payload=payload, tenant="t"))  # no inputs at all
    summaries = [
        {"name": "a.png", "size": 10_244},
        {"name": "b.png", "url": "https://example.com/b.png", "sha256": "ab" * 32},
        {"name": "c.bin", "size": 2},
    ]
    listed = await store.list_tasks(tenant="t")
    assert [entry.payload for entry in listed.tasks] == [{}, {}]
    assert [entry.inputs for entry in listed.tasks] == [None, summaries]
    assert listed.tasks[1].metadata == {"k": 1}
    whole = await store.get_task(task.id)  # the task itself keeps both
    assert (whole.payload, whole.inputs) == (payload, inputs)
    # A page cut short by its reader goes on after any task of it.
    rest = await store.list_tasks(tenant="t", limit=5, cursor=cursor_after(listed.tasks[0]))
    assert [entry.id for entry in rest.tasks] == [task.id]


async def test_queue_metrics_and_counts(store: Store) -> None:
    empty = await store.queue_metrics()
    assert (empty.pending_tasks, empty.oldest_pending_age_s) == (0, None)
    for priority in (0, 0, 1, 2):
        await store.create_task(new(priority, tenant="alice"))
    await store.create_task(new(0, tenant="bob"))
    [claimed] = await claim_next(store, "d", 30)
    await store.complete_task(lease_of(claimed), {})
    [claimed] = await claim_next(store, "d", 30)
    metrics = await store.queue_metrics()
    assert (metrics.pending_tasks, metrics.running_tasks, metrics.completed_tasks) == (3, 1, 1)
    assert (metrics.failed_tasks, metrics.cancelled_tasks) == (0, 0)
    assert metrics.oldest_pending_age_s is not None
    assert 0 <= metrics.oldest_pending_age_s < 60
    assert (await store.queue_metrics(tenant="bob")).pending_tasks == 1
    assert await store.count_by_status_and_priority() == [
        (TaskStatus.COMPLETED, 2, 1),
        (TaskStatus.PENDING, 0, 3),
        (TaskStatus.RUNNING, 1, 1),
    ]
    assert await store.demand_by_pool() == {None: (3, 1)}


def worker(worker_id: str, state: WorkerState, pool: str = "gpu") -> Worker:
    now = datetime.now(UTC)
    return Worker(id=worker_id, pool=pool, provider="static", state=state, created_at=now, updated_at=now)


async def test_worker_records(store: Store) -> None:
    first = await store.upsert_worker(worker("w1", WorkerState.STARTING))
    assert first.state is WorkerState.STARTING
    assert first.created_at.utcoffset() == timedelta(0)
    changed = worker("w1", WorkerState.IDLE)
    changed.endpoint = "http://127.0.0.1:8188"
    changed.loaded_models = ["model.safetensors"]
    changed.node_types = ["KSampler"]
    changed.labels = {"comfyfleet.pool": "gpu"}
    changed.info = {"vram": 24}
    changed.current_task_ids = ["t1"]
    updated = await store.upsert_worker(changed)
    assert updated.created_at == first.created_at
    assert updated.state is WorkerState.IDLE
    fetched = await store.get_worker("w1")
    assert (fetched.endpoint, fetched.loaded_models, fetched.node_types) == (
        "http://127.0.0.1:8188",
        ["model.safetensors"],
        ["KSampler"],
    )
    assert (fetched.labels, fetched.info, fetched.current_task_ids, fetched.port) == (
        {"comfyfleet.pool": "gpu"},
        {"vram": 24},
        ["t1"],
        8188,
    )
    for worker_id, state in (
        ("w2", WorkerState.BUSY),
        ("w3", WorkerState.TERMINATED),
        ("w4", WorkerState.FAILED),
        ("w5", WorkerState.PENDING),
        ("w6", WorkerState.TERMINATING),
    ):
        await store.upsert_worker(worker(worker_id, state, pool="cpu" if worker_id == "w2" else "gpu"))
    assert [w.id for w in await store.list_workers()] == ["w1", "w2", "w4", "w5", "w6"]
    assert [w.id for w in await store.list_workers(pool="cpu")] == ["w2"]
    assert "w3" in [w.id for w in await store.list_workers(include_gone=True)]
    metrics = await store.worker_metrics()
    assert (
        metrics.total_workers,
        metrics.idle_workers,
        metrics.running_workers,
        metrics.starting_workers,
    ) == (5, 1, 1, 0)
    assert (metrics.failed_workers, metrics.pending_workers, metrics.terminating_workers) == (1, 1, 1)
    await store.delete_worker("w1")
    await store.delete_worker("w1")  # deleting twice is harmless
    with pytest.raises(NotFound):
        await store.get_worker("w1")


async def test_notifications_reach_listeners_of_this_store(store: Store) -> None:
    listener = store.listen()
    await store.notify("tasks", '{"id": "1"}')
    await store.notify("task:1", "")
    first = await asyncio.wait_for(anext(listener), 5)
    second = await asyncio.wait_for(anext(listener), 5)
    assert (first.channel, first.payload, second.channel) == ("tasks", '{"id": "1"}', "task:1")


async def test_store_is_ready_once_migrated(store: Store) -> None:
    assert await store.is_ready()
    assert await store.migrate() == []
    assert await store.try_leader("autoscaler")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def two_store_urls(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, str]:
    """Two separate stores of one backend: the first without its schema yet."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'one.db'}", f"sqlite:///{tmp_path / 'two.db'}"
    return request.getfixturevalue("empty_postgres_url"), request.getfixturevalue("postgres_url")


async def test_installation_id_is_made_by_the_migrations_kept_across_reopen_and_differs_per_store(
    two_store_urls: tuple[str, str],
) -> None:
    first_url, second_url = two_store_urls
    async with open_store(first_url) as first:
        with pytest.raises(StoreUnavailable, match="migrate"):
            await first.installation_id()
        await first.migrate()
        identity = await first.installation_id()
        assert re.fullmatch(r"[0-9a-f]{16}", identity), identity
        assert await first.installation_id() == identity
    async with open_store(first_url) as reopened:
        assert await reopened.migrate() == []
        assert await reopened.installation_id() == identity
    async with open_store(second_url) as second:
        await second.migrate()
        assert await second.installation_id() != identity


def expected_positions(current: list[Task]) -> dict[str, int]:
    """Every pending task's position as the claim order gives it (the slow, obvious way)."""
    pending = [task for task in current if task.status is TaskStatus.PENDING]
    runnable = [task for task in pending if task.not_before is None or task.not_before <= datetime.now(UTC)]
    order = claim_order(runnable)
    ahead_of = {
        task.id: sum(1 for other in runnable if (-other.priority, other.seq) < (-task.priority, task.seq))
        for task in pending
    }
    assert all(ahead_of[task_id] == index for index, task_id in enumerate(order))
    return {task_id: ahead + 1 for task_id, ahead in ahead_of.items()}


async def assert_counts_and_positions(store: Store, tasks: dict[str, Task], sample: list[str]) -> None:
    """The counts of every tenant and status, and the positions of the ``sample`` of ``tasks``."""
    current = [await store.get_task(task_id) for task_id in tasks]
    for tenant in ("alice", "bob"):
        metrics = await store.queue_metrics(tenant=tenant)
        mine = [task.status for task in current if task.tenant == tenant]
        assert (metrics.pending_tasks, metrics.running_tasks, metrics.completed_tasks) == tuple(
            mine.count(status) for status in (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.COMPLETED)
        )
        assert (metrics.failed_tasks, metrics.cancelled_tasks) == tuple(
            mine.count(status) for status in (TaskStatus.FAILED, TaskStatus.CANCELLED)
        )
    everyone = await store.queue_metrics()
    assert everyone.pending_tasks == sum(task.status is TaskStatus.PENDING for task in current)
    expected = expected_positions(current)
    for task_id in sample:
        assert await store.queue_position(task_id) == expected.get(task_id), task_id


@pytest.mark.slow
async def test_counts_and_positions_stay_exact_across_blocks_of_the_queue(store: Store) -> None:
    """Positions and /queue/metrics come from counters that triggers keep (per priority and block of 1,024
    seq values): they must stay exact under every transition, with a queue longer than one block."""
    created = await asyncio.gather(
        *(store.create_task(new(index % 3, tenant="alice" if index % 4 else "bob")) for index in range(1300))
    )
    tasks = {task.id: task for task, _ in created}
    # Spot checks over the whole queue, then the transitions one by one.
    sample = random.Random(7).sample(sorted(tasks), 40)
    await assert_counts_and_positions(store, tasks, sample)
    claimed = await claim_next(store, "d", 30, limit=5)
    sample += [task.id for task in claimed]
    await store.complete_task(lease_of(claimed[0]), {})
    await store.fail_task(lease_of(claimed[1]), "broken", "node_error")
    await store.retry_task(
        lease_of(claimed[2]), datetime.now(UTC) - timedelta(seconds=1), "lost", "worker_lost"
    )
    await store.retry_task(
        lease_of(claimed[3]), datetime.now(UTC) + timedelta(hours=1), "lost", "worker_lost"
    )
    await store.release_task(lease_of(claimed[4]))
    # Pending ones from the sample (it may hold one of the five claimed above, now ended).
    victims = [task_id for task_id in sample if task_id not in {task.id for task in claimed}][:4]
    await store.cancel_task(victims[0])
    await store.set_priority(victims[1], 2)
    await store.set_priority(victims[2], -5)
    await store.set_priority(victims[3], 9)
    await assert_counts_and_positions(store, tasks, sample)
    # The whole queue drained: the counters come back to zero.
    while head := await store.peek_pending(limit=200):
        for task in await store.claim_ids("d", 30, [task.id for task in head]):
            await store.complete_task(lease_of(task), {})
    metrics = await store.queue_metrics()
    assert (metrics.pending_tasks, metrics.running_tasks) == (1, 0)  # the retry waiting an hour
    assert metrics.completed_tasks + metrics.failed_tasks + metrics.cancelled_tasks + 1 == len(tasks)


async def test_update_worker_activity_writes_only_the_activity_columns(store: Store) -> None:
    record = worker("w1", WorkerState.IDLE)
    record.node_types = ["KSampler", "SaveImage"]
    record.info = {"tasks_given": 1}
    await store.upsert_worker(record)
    busy = worker("w1", WorkerState.BUSY)
    busy.current_task_ids = ["t1"]
    busy.loaded_models = ["model.safetensors"]
    busy.last_active_at = datetime.now(UTC)
    busy.info = {"tasks_given": 2}

    assert await store.update_worker_activity(busy, owner=False)
    stored = await store.get_worker("w1")
    assert (stored.current_task_ids, stored.loaded_models) == (["t1"], ["model.safetensors"])
    assert (stored.state, stored.info, stored.node_types) == (
        WorkerState.IDLE,
        {"tasks_given": 1},
        record.node_types,
    )

    assert await store.update_worker_activity(busy, owner=True)
    stored = await store.get_worker("w1")
    assert (stored.state, stored.info, stored.node_types) == (
        WorkerState.BUSY,
        {"tasks_given": 2},
        record.node_types,
    )

    assert not await store.update_worker_activity(worker("nobody", WorkerState.IDLE), owner=True)
    await store.upsert_worker(worker("w1", WorkerState.TERMINATED))
    assert not await store.update_worker_activity(busy, owner=False)
    assert (await store.get_worker("w1")).state is WorkerState.TERMINATED


async def test_concurrent_submissions_are_stored_in_order_and_answered_one_by_one(store: Store) -> None:
    """Concurrent submissions share a commit (SQLite's group commit, PostgreSQL's batched insert): each is
    stored in submission order, and a bad one (an id already taken) fails alone."""
    await store.create_task(new(id="taken"))
    results = await asyncio.gather(
        *(store.create_task(new(index % 3, id="taken" if index == 7 else None)) for index in range(40)),
        return_exceptions=True,
    )
    assert isinstance(results[7], Conflict)
    stored = [
        result[0]
        for index, result in enumerate(results)
        if index != 7 and not isinstance(result, BaseException)
    ]
    assert len(stored) == 39
    assert [task.seq for task in stored] == sorted(task.seq for task in stored)
    for task in stored:
        read = await store.get_task(task.id)
        assert (read.seq, read.priority, read.payload, read.created_at) == (
            task.seq,
            task.priority,
            PAYLOAD,
            task.created_at,
        )
    assert (await store.queue_metrics()).pending_tasks == 40
