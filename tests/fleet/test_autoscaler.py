"""Table-driven tests of the autoscaler's pure decision, no fakes: snapshot + policy in, actions out."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from comfyfleet.domain import WorkerState
from comfyfleet.fleet.autoscaler import (
    Action,
    Hold,
    PoolSnapshot,
    ScalingPolicy,
    StartWorkers,
    StopWorker,
    WorkerView,
    decide,
    start_backoff_s,
)

NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def worker(
    worker_id: str,
    state: WorkerState = WorkerState.IDLE,
    *,
    idle_s: float = 0.0,
    busy: bool = False,
    age_s: float = 600,
) -> WorkerView:
    return WorkerView(id=worker_id, state=state, created_at=ago(age_s), last_active_at=ago(idle_s), busy=busy)


@dataclass
class Case:
    name: str
    policy: ScalingPolicy
    pending: int = 0
    running: int = 0
    workers: tuple[WorkerView, ...] = ()
    expect_start: int = 0
    expect_stop: set[str] = field(default_factory=set)
    expect_hold: str | None = None
    failed_starts: int = 0
    last_failed_start_ago: float | None = None
    last_scale_up_ago: float | None = None
    last_scale_down_ago: float | None = None


POLICY = ScalingPolicy(
    min_workers=0, max_workers=4, idle_timeout_s=60, start_backoff_base_s=5, start_backoff_max_s=80
)

CASES = [
    Case("nothing to do at rest", POLICY),
    Case("scale from zero to the demand", POLICY, pending=3, expect_start=3),
    Case("max cap", POLICY, pending=20, expect_start=4),
    Case(
        "running tasks count as demand",
        POLICY,
        pending=1,
        running=2,
        workers=(worker("a", WorkerState.BUSY, busy=True),),
        expect_start=2,
    ),
    Case(
        "starting workers count as capacity",
        POLICY,
        pending=3,
        workers=(worker("a", WorkerState.STARTING), worker("b", WorkerState.PENDING)),
        expect_start=1,
    ),
    Case(
        "starting workers cover the whole demand",
        POLICY,
        pending=2,
        workers=(worker("a", WorkerState.STARTING), worker("b", WorkerState.STARTING)),
    ),
    Case(
        "at max cap with starting workers nothing more starts",
        POLICY,
        pending=50,
        workers=tuple(worker(f"s{i}", WorkerState.STARTING) for i in range(4)),
    ),
    Case("min floor with no demand", ScalingPolicy(min_workers=2, max_workers=4), expect_start=2),
    Case(
        "min floor keeps idle workers past their timeout",
        ScalingPolicy(min_workers=1, max_workers=4, idle_timeout_s=60),
        workers=(worker("a", idle_s=500), worker("b", idle_s=400)),
        expect_stop={"a"},
    ),
    Case(
        "scale to zero after idle_timeout",
        POLICY,
        workers=(worker("a", idle_s=61), worker("b", idle_s=120)),
        expect_stop={"a", "b"},
    ),
    Case("idle but not long enough stays", POLICY, workers=(worker("a", idle_s=59),)),
    Case(
        "busy worker never terminated even when idle for long",
        POLICY,
        workers=(worker("a", WorkerState.BUSY, idle_s=999, busy=True), worker("b", idle_s=999, busy=True)),
    ),
    Case(
        "busy never terminated above max either",
        ScalingPolicy(min_workers=0, max_workers=1, idle_timeout_s=60),
        running=2,
        workers=(worker("a", WorkerState.BUSY, busy=True), worker("b", WorkerState.BUSY, busy=True)),
    ),
    Case(
        "above max (config shrank): idle first, at once, then starting",
        ScalingPolicy(min_workers=0, max_workers=1, idle_timeout_s=600),
        running=1,
        workers=(
            worker("busy", WorkerState.BUSY, busy=True),
            worker("idle", idle_s=1),
            worker("boot", WorkerState.STARTING),
        ),
        expect_stop={"idle", "boot"},
    ),
    Case(
        "demand keeps workers that would otherwise time out",
        POLICY,
        pending=2,
        workers=(worker("a", idle_s=500), worker("b", idle_s=450), worker("c", idle_s=100)),
        expect_stop={"a"},
    ),
    Case(
        "longest idle goes first",
        POLICY,
        pending=1,
        workers=(worker("a", idle_s=70), worker("b", idle_s=300)),
        expect_stop={"b"},
    ),
    Case(
        "scale-up cooldown holds",
        ScalingPolicy(max_workers=4, scale_up_cooldown_s=30),
        pending=2,
        last_scale_up_ago=10,
        expect_hold="scale-up cooldown",
    ),
    Case(
        "scale-up cooldown over",
        ScalingPolicy(max_workers=4, scale_up_cooldown_s=30),
        pending=2,
        last_scale_up_ago=31,
        expect_start=2,
    ),
    Case(
        "scale-down cooldown holds",
        ScalingPolicy(max_workers=4, idle_timeout_s=60, scale_down_cooldown_s=30),
        workers=(worker("a", idle_s=100),),
        last_scale_down_ago=5,
    ),
    Case(
        "scale-down cooldown over",
        ScalingPolicy(max_workers=4, idle_timeout_s=60, scale_down_cooldown_s=30),
        workers=(worker("a", idle_s=100),),
        last_scale_down_ago=31,
        expect_stop={"a"},
    ),
    Case(
        "back-off after one failed start",
        POLICY,
        pending=1,
        failed_starts=1,
        last_failed_start_ago=4,
        expect_hold="backing off",
    ),
    Case(
        "back-off over after base",
        POLICY,
        pending=1,
        failed_starts=1,
        last_failed_start_ago=5.5,
        expect_start=1,
    ),
    Case(
        "back-off doubles",
        POLICY,
        pending=1,
        failed_starts=3,
        last_failed_start_ago=19,
        expect_hold="backing off",
    ),
    Case(
        "doubled back-off over",
        POLICY,
        pending=1,
        failed_starts=3,
        last_failed_start_ago=20.5,
        expect_start=1,
    ),
    Case("back-off capped", POLICY, pending=1, failed_starts=30, last_failed_start_ago=81, expect_start=1),
    Case(
        "failed workers are cleaned up and replaced",
        POLICY,
        pending=1,
        workers=(worker("dead", WorkerState.FAILED),),
        expect_stop={"dead"},
        expect_start=1,
    ),
    Case(
        "drained worker stops once it holds no task",
        POLICY,
        workers=(worker("d1", WorkerState.DRAINING), worker("d2", WorkerState.DRAINING, busy=True)),
        expect_stop={"d1"},
    ),
    Case(
        "terminating workers are not capacity",
        POLICY,
        pending=1,
        workers=(worker("t", WorkerState.TERMINATING),),
        expect_start=1,
    ),
    Case(
        "max_workers counts draining and stopping instances: their replacements wait",
        ScalingPolicy(max_workers=2),
        pending=5,
        workers=(worker("d", WorkerState.DRAINING, busy=True), worker("t", WorkerState.TERMINATING)),
        expect_hold="at max_workers 2",
    ),
    Case(
        "a replacement starts in the room left beside a draining worker",
        ScalingPolicy(max_workers=3),
        pending=5,
        workers=(worker("d", WorkerState.DRAINING, busy=True), worker("b", WorkerState.BUSY, busy=True)),
        expect_start=1,
    ),
    Case(
        "a failed worker at the cap is stopped before it is replaced",
        ScalingPolicy(max_workers=1),
        pending=1,
        workers=(worker("dead", WorkerState.FAILED),),
        expect_stop={"dead"},
        expect_hold="until a stopping worker is gone",
    ),
    Case("tasks per worker", ScalingPolicy(max_workers=10, tasks_per_worker=3), pending=7, expect_start=3),
    Case("max zero never starts", ScalingPolicy(min_workers=0, max_workers=0), pending=5),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_decide(case: Case) -> None:
    snapshot = PoolSnapshot(
        pool="p",
        now=NOW,
        pending_tasks=case.pending,
        running_tasks=case.running,
        workers=case.workers,
        failed_starts=case.failed_starts,
        last_failed_start_at=None if case.last_failed_start_ago is None else ago(case.last_failed_start_ago),
        last_scale_up_at=None if case.last_scale_up_ago is None else ago(case.last_scale_up_ago),
        last_scale_down_at=None if case.last_scale_down_ago is None else ago(case.last_scale_down_ago),
    )
    actions: list[Action] = decide(snapshot, case.policy)
    started = sum(action.count for action in actions if isinstance(action, StartWorkers))
    stopped = {action.worker_id for action in actions if isinstance(action, StopWorker)}
    holds = [action.reason for action in actions if isinstance(action, Hold)]
    assert started == case.expect_start
    assert stopped == case.expect_stop
    if case.expect_hold is None:
        assert holds == []
    else:
        assert len(holds) == 1
        assert case.expect_hold in holds[0]
    busy = {view.id for view in case.workers if view.busy}
    assert not (stopped & busy), "a busy worker must never be stopped"


def test_backoff_grows_and_caps() -> None:
    policy = ScalingPolicy(start_backoff_base_s=2, start_backoff_max_s=30)
    assert [start_backoff_s(n, policy) for n in range(7)] == [0, 2, 4, 8, 16, 30, 30]


def test_decide_is_pure() -> None:
    snapshot = PoolSnapshot(pool="p", now=NOW, pending_tasks=2, workers=(worker("a", idle_s=999),))
    first = decide(snapshot, POLICY)
    assert first == decide(snapshot, POLICY)
    assert len(first) == 1
    assert isinstance(first[0], StartWorkers)
    assert first[0].count == 1
