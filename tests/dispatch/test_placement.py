"""Placement is a pure function: table-driven tests, no fakes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from comfyfleet.dispatch.placement import PendingTask, Slot, fair_share, plan, skipped_ids, unplaceable
from comfyfleet.domain import Task, TaskStatus


def task(
    task_id: str,
    *,
    priority: int = 0,
    models: tuple[str, ...] = (),
    nodes: tuple[str, ...] = ("SaveImage",),
    pool: str | None = None,
    skips: int = 0,
) -> PendingTask:
    return PendingTask(task_id, priority, pool, frozenset(nodes), frozenset(models), skips)


def slot(
    worker_id: str,
    *,
    free: int = 1,
    assigned: int = 0,
    models: tuple[str, ...] = (),
    nodes: tuple[str, ...] | None = None,
    pools: tuple[str, ...] = ("default",),
) -> Slot:
    return Slot(
        worker_id, frozenset(pools), free, assigned, frozenset(nodes) if nodes is not None else None, models
    )


def test_idle_worker_preferred_over_busy_one() -> None:
    result = plan([task("t1")], [slot("busy", free=1, assigned=1), slot("idle", free=1)])
    assert result == [("t1", "idle")]


def test_worker_with_model_loaded_preferred() -> None:
    window = [task("t1", models=("a.safetensors",))]
    result = plan(window, [slot("w1", models=("b.safetensors",)), slot("w2", models=("a.safetensors",))])
    assert result == [("t1", "w2")]


def test_free_worker_picks_task_whose_model_it_holds_within_priority() -> None:
    window = [task("t1", models=("a",)), task("t2", models=("b",))]
    result = plan(window, [slot("w-b", models=("b",))])
    assert result == [("t2", "w-b")]


def test_higher_priority_wins_over_model_affinity() -> None:
    window = [task("urgent", priority=10, models=("a",)), task("t2", models=("b",))]
    assert plan(window, [slot("w-b", models=("b",))]) == [("urgent", "w-b")]


def test_task_skipped_too_often_goes_first() -> None:
    window = [task("old", models=("a",), skips=16), task("t2", models=("b",))]
    assert plan(window, [slot("w-b", models=("b",))], max_skips=16) == [("old", "w-b")]


def test_without_model_awareness_fifo() -> None:
    window = [task("t1", models=("a",)), task("t2", models=("b",))]
    assert plan(window, [slot("w-b", models=("b",))], model_aware=False) == [("t1", "w-b")]


def test_worker_missing_node_type_never_chosen() -> None:
    window = [task("t1", nodes=("SaveImage", "FancyNode"))]
    result = plan(
        window,
        [
            slot("plain", nodes=("SaveImage",)),
            slot("fancy", free=1, assigned=1, nodes=("SaveImage", "FancyNode")),
        ],
    )
    assert result == [("t1", "fancy")]
    assert plan(window, [slot("plain", nodes=("SaveImage",))]) == []


def test_pool_respected() -> None:
    window = [task("t1", pool="gpu-big")]
    assert plan(window, [slot("w1", pools=("default",))]) == []
    assert plan(window, [slot("w2", pools=("big", "gpu-big"))]) == [("t1", "w2")]


def test_fills_every_free_slot_in_fifo_order() -> None:
    window = [task(f"t{i}") for i in range(5)]
    result = plan(window, [slot("w1", free=2), slot("w2", free=2)])
    assert [task_id for task_id, _ in result] == ["t0", "t1", "t2", "t3"]
    assert sorted(worker for _, worker in result) == ["w1", "w1", "w2", "w2"]


def test_oldest_unclaimed_model_taken_when_nothing_matches() -> None:
    # w-c holds nothing useful; "a" is held by w-a (busy but with a free prefetch slot), so w-c should take "b".
    window = [task("t1", models=("a",)), task("t2", models=("b",))]
    result = plan(window, [slot("w-c", models=("c",)), slot("w-a", free=0, assigned=2, models=("a",))])
    assert result == [("t2", "w-c")]


@pytest.mark.parametrize(
    ("workers", "expected"),
    [
        ([], False),
        ([slot("w", nodes=None)], False),
        ([slot("w", nodes=("SaveImage",))], True),
        ([slot("w", nodes=("SaveImage", "X"))], False),
    ],
)
def test_unplaceable(workers: list[Slot], expected: bool) -> None:
    assert unplaceable(task("t", nodes=("SaveImage", "X")), workers) is expected


def test_skipped_ids() -> None:
    window = [task("t1"), task("t2"), task("t3")]
    assert skipped_ids(window, {"t3"}) == ["t1", "t2"]
    assert skipped_ids(window, set()) == []


def test_idle_worker_leaves_a_short_backlog_to_the_busy_worker_holding_its_model() -> None:
    window = [task("t1", models=("a",)), task("t2", models=("a",))]
    busy_holder = slot("w-a", free=0, assigned=2, models=("a",))
    assert plan(window, [slot("idle", models=("c",)), busy_holder]) == []


def test_idle_worker_takes_over_a_long_backlog() -> None:
    window = [task(f"t{n}", models=("a",)) for n in range(5)]
    busy_holder = slot("w-a", free=0, assigned=2, models=("a",))
    assert plan(window, [slot("idle", models=("c",)), busy_holder], steal_backlog=3) == [("t0", "idle")]


def _queued(tenant: str, seq: int, priority: int = 0) -> Task:
    now = datetime.now(UTC)
    return Task(
        id=f"{tenant}-{seq}",
        seq=seq,
        workflow_id=None,
        priority=priority,
        status=TaskStatus.PENDING,
        payload={},
        created_at=now,
        updated_at=now,
        tenant=tenant,
    )


def test_fair_share_lets_tenants_take_turns_within_a_priority() -> None:
    crowd = [_queued("crowd", seq) for seq in range(1, 6)]
    lone = _queued("lone", 6)
    urgent = _queued("other", 7, priority=3)
    order = fair_share([*crowd, lone, urgent], running={"crowd": 2})
    # Higher priority first; then the tenant with nothing running goes before the crowd's backlog.
    assert [task.id for task in order] == [
        "other-7",
        "lone-6",
        "crowd-1",
        "crowd-2",
        "crowd-3",
        "crowd-4",
        "crowd-5",
    ]
    # Without running tasks, turns alternate: crowd-1, lone-6, then the crowd's rest in order.
    assert [task.id for task in fair_share([*crowd[:3], lone], running={})] == [
        "crowd-1",
        "lone-6",
        "crowd-2",
        "crowd-3",
    ]
    assert fair_share([], running={"crowd": 1}) == []
