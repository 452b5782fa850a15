"""A hypothesis state machine drives the task lifecycle on a real store and checks it against a tiny model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from comfyfleet.domain import NewTask, TaskStatus
from comfyfleet.store import Conflict, Lease, StaleLease, Store

T = TypeVar("T")
OWNER = "dispatcher"


@dataclass
class ModelTask:
    order: int  # creation order: FIFO within a priority
    priority: int
    status: TaskStatus = TaskStatus.PENDING
    runnable: bool = True  # False while a retry waits for its not_before
    attempt: int = 0
    retry_count: int = 0
    cancel_requested: bool = False
    recorded_attempts: int = 0


class TaskLifecycle(RuleBasedStateMachine):
    open_store: Callable[[], AbstractAsyncContextManager[Store]]

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.exit_stack = AsyncExitStack()
        self.store: Store = self.run(self.exit_stack.enter_async_context(self.open_store()))
        self.model: dict[str, ModelTask] = {}

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coroutine)

    def teardown(self) -> None:
        try:
            self.run(self.exit_stack.aclose())
        finally:
            self.runner.close()

    def ids_with(self, *statuses: TaskStatus) -> list[str]:
        # In creation order, never by id: ids are random, and the same draws must pick the same tasks.
        return [task_id for task_id, task in self.model.items() if task.status in statuses]

    def lease(self, task_id: str) -> Lease:
        return Lease(task_id, self.model[task_id].attempt, OWNER)

    def claim_order(self) -> list[str]:
        runnable = [
            (task_id, task)
            for task_id, task in self.model.items()
            if task.status is TaskStatus.PENDING and task.runnable
        ]
        return [
            task_id for task_id, task in sorted(runnable, key=lambda item: (-item[1].priority, item[1].order))
        ]

    def end_attempt(self, task_id: str, status: TaskStatus) -> None:
        task = self.model[task_id]
        task.status = status
        task.recorded_attempts += 1

    # -- rules ----------------------------------------------------------------------------------
    @rule(priority=st.integers(0, 3))
    def submit(self, priority: int) -> None:
        task, created = self.run(
            self.store.create_task(
                NewTask(payload={"1": {"class_type": "X", "inputs": {}}}, priority=priority)
            )
        )
        assert created
        self.model[task.id] = ModelTask(order=len(self.model), priority=priority)

    @rule(limit=st.integers(1, 3), data=st.data())
    def claim(self, limit: int, data: st.DataObject) -> None:
        # The dispatcher's path: peek at the head, place some of it, claim exactly those.
        expected = self.claim_order()[:limit]
        head = self.run(self.store.peek_pending(limit=limit))
        assert [task.id for task in head] == expected
        placed = data.draw(st.lists(st.sampled_from(expected), unique=True)) if expected else []
        claimed = self.run(self.store.claim_ids(OWNER, 3600, placed))
        assert [task.id for task in claimed] == [task_id for task_id in expected if task_id in placed]
        for task in claimed:
            model = self.model[task.id]
            model.status = TaskStatus.RUNNING
            model.attempt += 1
            assert task.attempt == model.attempt

    @precondition(lambda self: self.ids_with(TaskStatus.RUNNING))
    @rule(data=st.data(), outcome=st.sampled_from(["complete", "fail", "finish_cancelled"]))
    def finish(self, data: st.DataObject, outcome: str) -> None:
        task_id = data.draw(st.sampled_from(self.ids_with(TaskStatus.RUNNING)))
        lease = self.lease(task_id)
        if outcome == "complete":
            self.run(self.store.complete_task(lease, {"outputs": {}}))
            self.end_attempt(task_id, TaskStatus.COMPLETED)
        elif outcome == "fail":
            self.run(self.store.fail_task(lease, "node raised", "execution_error"))
            self.end_attempt(task_id, TaskStatus.FAILED)
        else:
            self.run(self.store.finish_cancelled(lease))
            self.end_attempt(task_id, TaskStatus.CANCELLED)

    @precondition(lambda self: self.ids_with(TaskStatus.RUNNING))
    @rule(data=st.data(), due=st.booleans())
    def retry(self, data: st.DataObject, due: bool) -> None:
        task_id = data.draw(st.sampled_from(self.ids_with(TaskStatus.RUNNING)))
        not_before = datetime.now(UTC) + (timedelta(seconds=-1) if due else timedelta(hours=1))
        task = self.run(self.store.retry_task(self.lease(task_id), not_before, "worker lost", "worker_lost"))
        model = self.model[task_id]
        if model.cancel_requested:
            self.end_attempt(task_id, TaskStatus.CANCELLED)
        else:
            self.end_attempt(task_id, TaskStatus.PENDING)
            model.retry_count += 1
            model.runnable = due
        assert task.status is model.status

    @precondition(lambda self: self.ids_with(TaskStatus.RUNNING))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self.ids_with(TaskStatus.RUNNING)))
        self.run(self.store.release_task(self.lease(task_id)))
        model = self.model[task_id]
        if model.cancel_requested:
            self.end_attempt(task_id, TaskStatus.CANCELLED)
        else:
            model.status = TaskStatus.PENDING

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(list(self.model)))
        model = self.model[task_id]
        if model.status in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED):
            with pytest.raises(Conflict):
                self.run(self.store.cancel_task(task_id))
            return
        self.run(self.store.cancel_task(task_id))
        if model.status is TaskStatus.PENDING:
            model.status = TaskStatus.CANCELLED
        else:
            model.cancel_requested = True

    @precondition(lambda self: any(task.attempt for task in self.model.values()))
    @rule(data=st.data(), stale_by=st.sampled_from(["older_attempt", "other_owner", "finished"]))
    def stale_write_is_refused(self, data: st.DataObject, stale_by: str) -> None:
        task_id = data.draw(st.sampled_from([i for i, task in self.model.items() if task.attempt]))
        model = self.model[task_id]
        if stale_by == "older_attempt":
            lease = Lease(task_id, model.attempt - 1, OWNER)
        elif stale_by == "other_owner":
            lease = Lease(task_id, model.attempt, "another-replica")
        elif model.status is not TaskStatus.RUNNING:
            lease = self.lease(task_id)  # its last lease, after the attempt ended
        else:
            return
        with pytest.raises(StaleLease):
            self.run(self.store.complete_task(lease, {}))

    @rule()
    def restart_adopts_own_tasks(self) -> None:
        adopted = self.run(self.store.adopt_expired(OWNER, 3600, previous_owner=OWNER))
        assert sorted(task.id for task in adopted) == sorted(self.ids_with(TaskStatus.RUNNING))
        for task in adopted:
            self.model[task.id].attempt += 1
            assert task.attempt == self.model[task.id].attempt

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def store_matches_model(self) -> None:
        page = self.run(self.store.list_tasks(limit=1000))
        assert len(page.tasks) == len(self.model)
        for task in page.tasks:
            model = self.model[task.id]
            assert (task.status, task.attempt, task.retry_count, task.cancel_requested) == (
                model.status,
                model.attempt,
                model.retry_count,
                model.cancel_requested,
            ), task.id
            assert len(task.attempts) == model.recorded_attempts
            assert (task.completed_at is not None) == task.is_terminal

    @invariant()
    def queue_positions_follow_claim_order(self) -> None:
        for position, task_id in enumerate(self.claim_order(), start=1):
            assert self.run(self.store.queue_position(task_id)) == position
        metrics = self.run(self.store.queue_metrics())
        assert metrics.pending_tasks == len(self.ids_with(TaskStatus.PENDING))
        assert metrics.running_tasks == len(self.ids_with(TaskStatus.RUNNING))


@pytest.mark.slow
def test_task_lifecycle_matches_the_model(
    fresh_store_factory: Callable[[], AbstractAsyncContextManager[Store]],
) -> None:
    machine = type("Lifecycle", (TaskLifecycle,), {"open_store": staticmethod(fresh_store_factory)})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=12,
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
