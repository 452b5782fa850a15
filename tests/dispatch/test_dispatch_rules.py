"""The dispatcher's rules on their own, fast: timeouts and grace periods on a clock the test moves, retries
and their back-off, cancels, and what happens when the store does not answer. Real SQLite file, real
emulator workers on loopback; only the clock, the fleet and (where a test says so) the store's failures are
stand-ins (see ``fakes.py``)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from comfyfleet.domain import NewTask, Task, TaskPhase, TaskStatus
from comfyfleet.emulators.comfyui.options import EmulatorOptions
from comfyfleet.emulators.comfyui.server import EmulatorServer
from support import emulators, eventually, tiny_workflow

from .fakes import Harness, dispatching


async def _until(read: Callable[[], Any], what: str) -> None:
    await eventually(read, within=10, what=what, interval=0.005)


async def _running_on(worker: EmulatorServer, harness: Harness, task: Task) -> None:
    """Until the task's prompt executes on the worker and its timeout is counting."""
    await _until(lambda: worker.stats.prompts_started >= 1, "the prompt starting")
    await harness.wait_for_sleepers()


# -- timeouts -----------------------------------------------------------------------------------------


async def test_a_prompt_past_its_timeout_is_interrupted_and_the_task_fails(tmp_path: Path) -> None:
    async with (
        emulators(EmulatorOptions(prompt_time_s=60)) as (worker,),
        dispatching(tmp_path, [worker.url]) as h,
    ):
        task = await h.submit(tiny_workflow(), timeout_s=30)
        await _running_on(worker, h, task)
        h.clock.advance(29.9)
        assert h.clock.sleepers == 1  # not yet
        h.clock.advance(0.1)
        ended = await h.wait(task.id)
    assert ended.status is TaskStatus.FAILED
    assert ended.error_kind == "timeout"
    assert ended.error == "task timed out after 30 s"
    assert worker.stats.prompts_interrupted == 1  # stopped on the worker, by its prompt_id
    assert h.directory.recycled == []  # it stopped within the grace period


async def test_a_timed_out_prompt_that_ignores_the_interrupt_gets_its_worker_recycled(tmp_path: Path) -> None:
    deaf = EmulatorOptions(hang_s=5, hang_node="EmptyImage")  # a node without a progress bar: deaf
    async with emulators(deaf) as (worker,), dispatching(tmp_path, [worker.url], interrupt_grace_s=20) as h:
        task = await h.submit(tiny_workflow(), timeout_s=30)
        await _until(lambda: worker.stats.node_executions.get("EmptyImage") == 1, "the deaf node running")
        await h.wait_for_sleepers()
        h.clock.advance(30)
        await h.wait_for_sleepers()  # the grace period
        assert h.directory.recycled == []
        h.clock.advance(20)
        ended = await h.wait(task.id)
    assert ended.error_kind == "timeout"
    assert [worker_id for worker_id, _ in h.directory.recycled] == ["worker-0"]
    assert "ignored an interrupt" in h.directory.recycled[0][1]


async def test_with_retry_timeouts_a_timed_out_task_goes_back_to_the_queue(tmp_path: Path) -> None:
    slow = EmulatorOptions(prompt_time_s=60)
    async with (
        emulators(slow) as (worker,),
        dispatching(tmp_path, [worker.url], retry_timeouts=True, retry_base_s=600, retry_max_s=600) as h,
    ):
        task = await h.submit(tiny_workflow(), timeout_s=10, max_retries=2)
        await _running_on(worker, h, task)
        h.clock.advance(10)
        retried = await h.wait(task.id, lambda task: task.status is TaskStatus.PENDING)
    assert (retried.retry_count, retried.error_kind) == (1, "timeout")
    assert [attempt["kind"] for attempt in retried.attempts] == ["timeout"]


# -- retries ------------------------------------------------------------------------------------------


async def test_out_of_memory_is_retried_after_a_backoff_read_on_the_dispatchers_clock(tmp_path: Path) -> None:
    oom = EmulatorOptions(oom_rate=1.0)
    async with (
        emulators(oom) as (worker,),
        dispatching(tmp_path, [worker.url], retry_base_s=60, retry_max_s=600) as h,
    ):
        h.clock.advance(3600)  # the dispatcher's wall clock an hour ahead: the retry time follows it
        task = await h.submit(tiny_workflow(), max_retries=3)
        retried = await h.wait(task.id, lambda task: task.retry_count == 1)
        wait_s = (retried.not_before - h.clock.now()).total_seconds() if retried.not_before else None
    assert retried.status is TaskStatus.PENDING
    assert retried.error_kind == "out_of_memory"
    assert wait_s is not None
    assert 30 <= wait_s <= 60  # first back-off: uniform in [base/2, base]


async def test_out_of_memory_gives_up_after_max_retries(tmp_path: Path) -> None:
    async with (
        emulators(EmulatorOptions(oom_rate=1.0)) as (worker,),
        dispatching(tmp_path, [worker.url]) as h,
    ):
        task = await h.submit(tiny_workflow(), max_retries=1)
        ended = await h.wait(task.id)
    assert ended.status is TaskStatus.FAILED
    assert ended.error_kind == "out_of_memory"
    assert ended.error is not None
    assert ended.error.endswith("(gave up after 2 attempts)")
    assert [attempt["kind"] for attempt in ended.attempts] == ["out_of_memory", "out_of_memory"]
    assert worker.stats.prompts_failed == 2


async def test_a_node_error_on_the_users_input_is_not_retried(tmp_path: Path) -> None:
    failing = EmulatorOptions(failure_rate=1.0, seed=1)
    async with emulators(failing) as (worker,), dispatching(tmp_path, [worker.url]) as h:
        task = await h.submit(tiny_workflow(), max_retries=3)
        ended = await h.wait(task.id)
    assert (ended.status, ended.error_kind, ended.retry_count) == (TaskStatus.FAILED, "node_error", 0)


async def test_an_unreachable_worker_is_reported_and_the_task_retried_until_it_gives_up(
    tmp_path: Path,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening: refused
        async with dispatching(tmp_path, [nowhere]) as h:
            task = await h.submit(tiny_workflow(), max_retries=2)
            ended = await h.wait(task.id)
    assert (ended.status, ended.error_kind) == (TaskStatus.FAILED, "worker_unreachable")
    assert [attempt["kind"] for attempt in ended.attempts] == ["worker_unreachable"] * 3
    assert [worker_id for worker_id, _ in h.directory.unreachable] == ["worker-0"] * 3


# -- cancel -------------------------------------------------------------------------------------------


async def test_cancel_interrupts_a_running_prompt(tmp_path: Path) -> None:
    async with (
        emulators(EmulatorOptions(prompt_time_s=60)) as (worker,),
        dispatching(tmp_path, [worker.url]) as h,
    ):
        task = await h.submit(tiny_workflow())
        await _running_on(worker, h, task)
        await h.cancel(task.id)
        ended = await h.wait(task.id)
    assert ended.status is TaskStatus.CANCELLED
    assert [attempt["outcome"] for attempt in ended.attempts] == ["cancelled"]
    assert worker.stats.prompts_interrupted == 1
    assert h.statuses(task.id)[-1] == "cancelled"


async def test_cancel_dequeues_a_prompt_still_waiting_on_the_worker(tmp_path: Path) -> None:
    slow = EmulatorOptions(prompt_time_s=60)
    async with emulators(slow) as (worker,), dispatching(tmp_path, [worker.url], prefetch=1) as h:
        first = await h.submit(tiny_workflow(color=1))
        queued = await h.submit(tiny_workflow(color=2))
        waiting = await h.wait(queued.id, lambda task: task.phase is TaskPhase.QUEUED_ON_WORKER)
        await _until(lambda: worker.stats.prompts_started == 1, "the first prompt starting")
        await h.cancel(queued.id)
        ended = await h.wait(queued.id)
        assert (await h.store.get_task(first.id)).status is TaskStatus.RUNNING  # untouched
        await h.cancel(first.id)
        await h.wait(first.id)
    assert ended.status is TaskStatus.CANCELLED
    assert waiting.prompt_id not in worker.stats.executions  # it never ran
    assert worker.stats.prompts_interrupted == 1  # only the first, cancelled last


async def test_cancel_of_a_prompt_that_ignores_it_recycles_the_worker_after_the_grace(tmp_path: Path) -> None:
    deaf = EmulatorOptions(hang_s=5, hang_node="EmptyImage")
    async with emulators(deaf) as (worker,), dispatching(tmp_path, [worker.url], interrupt_grace_s=20) as h:
        task = await h.submit(tiny_workflow())
        await _until(lambda: worker.stats.node_executions.get("EmptyImage") == 1, "the deaf node running")
        await h.cancel(task.id)
        await h.wait_for_sleepers(2)  # the grace period, next to the task's own timeout
        h.clock.advance(20)
        ended = await h.wait(task.id)
    assert ended.status is TaskStatus.CANCELLED
    assert [worker_id for worker_id, _ in h.directory.recycled] == ["worker-0"]


# -- a store that does not answer ---------------------------------------------------------------------


async def test_a_result_the_store_cannot_take_is_kept_and_written_until_it_lands(tmp_path: Path) -> None:
    async with emulators(EmulatorOptions()) as (worker,), dispatching(tmp_path, [worker.url]) as h:
        h.flaky.fail("complete_task", 2)
        task = await h.submit(tiny_workflow())
        ended = await h.wait(task.id)
    assert ended.status is TaskStatus.COMPLETED
    assert h.flaky.calls["complete_task"] == 3
    assert len(ended.result["outputs"] if ended.result else []) == 1
    assert worker.stats.executions == {ended.prompt_id: 1}  # the prompt was not run again


async def test_a_result_whose_answer_was_lost_is_read_back_not_written_twice(tmp_path: Path) -> None:
    async with emulators(EmulatorOptions()) as (worker,), dispatching(tmp_path, [worker.url]) as h:
        h.flaky.fail("complete_task", 1, commit_first=True)
        task = await h.submit(tiny_workflow())
        await eventually(
            lambda: h.statuses(task.id),
            until=lambda statuses: "completed" in statuses,
            within=10,
            what="the completion published",
        )
        ended = await h.store.get_task(task.id)
        statuses = h.statuses(task.id)
    assert ended.status is TaskStatus.COMPLETED
    assert [attempt["outcome"] for attempt in ended.attempts] == ["completed"]
    assert statuses.count("completed") == 1


async def test_a_claim_whose_answer_was_lost_is_recovered_and_runs_once(tmp_path: Path) -> None:
    # The claim committed (with its worker and prompt id) but its answer never came: the dispatcher finds the
    # row running in its name, asks the worker about that prompt id and, as the worker never had it, sends it.
    async with emulators(EmulatorOptions()) as (worker,), dispatching(tmp_path, [worker.url]) as h:
        h.flaky.fail("claim_ids", 1, commit_first=True)
        task = await h.submit(tiny_workflow())
        ended = await h.wait(task.id)
    assert ended.status is TaskStatus.COMPLETED
    assert h.flaky.calls["claim_ids"] == 1
    assert [attempt["outcome"] for attempt in ended.attempts] == ["completed"]
    assert sum(worker.stats.executions.values()) == 1


async def test_a_cancel_reaches_an_attempt_waiting_for_the_store(tmp_path: Path) -> None:
    async with (
        emulators(EmulatorOptions(oom_rate=1.0)) as (worker,),
        dispatching(tmp_path, [worker.url], instant_retries=False) as h,
    ):
        h.flaky.fail("retry_task")  # the store is away when the failed prompt's retry is to be written
        task = await h.submit(tiny_workflow())
        await _until(lambda: h.flaky.calls.get("retry_task", 0) >= 1, "the retry's write failing")
        await h.cancel(task.id)
        tried = h.flaky.calls["retry_task"]
        await _until(lambda: h.flaky.calls["retry_task"] > tried, "the attempt trying again, still held")
        h.flaky.heal("retry_task")
        ended = await h.wait(task.id)
    assert ended.status is TaskStatus.CANCELLED  # not back in the queue: the cancel reached the attempt
    assert worker.stats.prompts_accepted == 1  # sent once, never again


async def test_a_running_row_the_dispatcher_does_not_hold_expires_and_is_run(tmp_path: Path) -> None:
    # Leases are renewed only for the attempts held in memory: a row this replica owns but lost track of
    # (a claim whose answer never came) is not kept alive forever; it expires, is adopted and runs.
    async with (
        emulators(EmulatorOptions()) as (worker,),
        dispatching(tmp_path, [worker.url], lease_s=0.6) as h,
    ):
        created, _ = await h.store.create_task(NewTask(payload=tiny_workflow()))
        [claimed] = await h.store.claim_ids("replica-test", 0.6, [created.id])
        ended = await h.wait(created.id)
    assert ended.status is TaskStatus.COMPLETED
    assert ended.attempt > claimed.attempt
    assert sum(worker.stats.executions.values()) == 1
