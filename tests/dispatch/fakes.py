"""Hand-written stand-ins for the dispatcher's seams, for fast tests of its rules: a clock the test moves,
a fleet of fixed workers (:class:`~comfyfleet.fleet.base.WorkerDirectory`), and a store that fails on
demand in front of a real SQLite file. Everything else is real: the store file, the emulator workers over
loopback, the outputs directory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import stamina

from comfyfleet.config import DispatchSettings
from comfyfleet.dispatch.dispatcher import Dispatcher
from comfyfleet.domain import NewTask, Task, Worker, WorkerState
from comfyfleet.events import CANCEL_CHANNEL, EventBus, Subscription, TaskEvent
from comfyfleet.outputs import open_outputs
from comfyfleet.store import Store, StoreUnavailable, open_store
from support import eventually


class FakeClock:
    """Monotonic and wall time that move only when the test says so; ``sleep`` waits for that."""

    def __init__(self) -> None:
        self._monotonic = 1000.0
        self._wall_start = datetime.now(UTC)
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._monotonic

    def now(self) -> datetime:
        return self._wall_start + timedelta(seconds=self._monotonic - 1000.0)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        entry = (self._monotonic + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    @property
    def sleepers(self) -> int:
        """How many sleeps are still waiting for time to pass."""
        return sum(1 for _, future in self._sleepers if not future.done())

    def advance(self, seconds: float) -> None:
        self._monotonic += seconds
        for deadline, future in list(self._sleepers):
            if deadline <= self._monotonic and not future.done():
                future.set_result(None)


class FakeDirectory:
    """A fleet of fixed workers that records what the dispatcher reports to it."""

    def __init__(self, endpoints: Sequence[str], *, prefetch: int = 0) -> None:
        now = datetime.now(UTC)
        self.workers = [
            Worker(
                id=f"worker-{n}",
                pool="default",
                provider="static",
                state=WorkerState.IDLE,
                created_at=now,
                updated_at=now,
                endpoint=endpoint,
            )
            for n, endpoint in enumerate(endpoints)
        ]
        self._prefetch = prefetch
        self._changed = asyncio.Event()
        self.assignments: dict[str, list[str]] = {}
        self.unreachable: list[tuple[str, str]] = []
        self.recycled: list[tuple[str, str]] = []
        self.models: dict[str, list[str]] = {}

    def usable_workers(self) -> Sequence[Worker]:
        return list(self.workers)

    def prefetch(self, worker: Worker) -> int:
        return self._prefetch

    async def wait_changed(self) -> None:
        await self._changed.wait()

    async def set_assignments(self, worker_id: str, task_ids: Sequence[str]) -> None:
        self.assignments[worker_id] = list(task_ids)

    async def note_loaded_models(self, worker_id: str, models: Sequence[str]) -> None:
        self.models[worker_id] = list(models)

    async def report_unreachable(self, worker_id: str, reason: str) -> None:
        self.unreachable.append((worker_id, reason))

    async def recycle(self, worker_id: str, reason: str) -> None:
        self.recycled.append((worker_id, reason))


@dataclass
class _Fault:
    times: int | None  # None: until healed
    commit_first: bool  # the write lands, then its answer is lost (a connection cut after the commit)


class FlakyStore:
    """A real store that fails the next calls of chosen methods with :class:`StoreUnavailable`, as an
    outage does; every other call, and every call once the faults are used up, goes to the real store."""

    def __init__(self, real: Store) -> None:
        self._real = real
        self._faults: dict[str, _Fault] = {}
        self.calls: dict[str, int] = {}

    def fail(self, method: str, times: int | None = None, *, commit_first: bool = False) -> None:
        """Fail the next ``times`` calls of ``method`` (``None``: every call until :meth:`heal`)."""
        self._faults[method] = _Fault(times, commit_first)

    def heal(self, method: str) -> None:
        self._faults.pop(method, None)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._real, name)
        if not asyncio.iscoroutinefunction(target):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            fault = self._faults.get(name)
            if fault is None or fault.times == 0:
                return await target(*args, **kwargs)
            if fault.times is not None:
                fault.times -= 1
            if fault.commit_first:
                await target(*args, **kwargs)
            raise StoreUnavailable(f"{name}: the store went away (injected)")

        return call


@dataclass
class Harness:
    dispatcher: Dispatcher
    store: Store
    flaky: FlakyStore
    directory: FakeDirectory
    clock: FakeClock
    subscription: Subscription
    published: list[TaskEvent] = field(default_factory=list)

    def statuses(self, task_id: str) -> list[str]:
        """The status events published for a task so far."""
        while not self.subscription.queue.empty():
            self.published.append(self.subscription.queue.get_nowait())
        return [e.data["status"] for e in self.published if e.task_id == task_id and e.type == "status"]

    async def submit(self, payload: dict[str, Any], **fields: Any) -> Task:
        task, _ = await self.store.create_task(NewTask(payload=payload, **fields))
        self.dispatcher.wake()
        return task

    async def cancel(self, task_id: str) -> None:
        await self.store.cancel_task(task_id)
        await self.store.notify(CANCEL_CHANNEL, task_id)

    async def wait(self, task_id: str, check: Any = None, *, timeout_s: float = 10.0) -> Task:
        ended = check or (lambda task: task.is_terminal)
        task: Task = await eventually(
            lambda: self.store.get_task(task_id),
            until=ended,
            within=timeout_s,
            what=f"task {task_id}",
            interval=0.01,
        )
        return task

    async def wait_for_sleepers(self, count: int = 1) -> None:
        """Until the dispatcher waits on the clock ``count`` times (timeouts, grace periods)."""
        await eventually(
            lambda: self.clock.sleepers,
            until=lambda sleepers: sleepers >= count,
            within=10,
            what="the dispatcher waiting on its clock",
            interval=0.005,
        )


@asynccontextmanager
async def dispatching(
    tmp_path: Path,
    endpoints: Sequence[str],
    *,
    prefetch: int = 0,
    instant_retries: bool = True,
    **settings: Any,
) -> AsyncIterator[Harness]:
    """A running :class:`Dispatcher` over a SQLite file, with a fake clock and a fake directory. Writes the
    store could not take are tried again at once (stamina's test mode) unless ``instant_retries`` is off."""
    dispatch = DispatchSettings(
        **{"lease_s": 5.0, "retry_base_s": 0.0, "retry_max_s": 0.0, "interrupt_grace_s": 30.0, **settings}
    )
    clock = FakeClock()
    directory = FakeDirectory(endpoints, prefetch=prefetch)
    async with open_store(f"sqlite:///{tmp_path / 'store.db'}") as real:
        await real.migrate()
        flaky = FlakyStore(real)
        bus = EventBus()
        dispatcher = Dispatcher(
            flaky,  # type: ignore[arg-type]
            directory,
            open_outputs(str(tmp_path / "outputs")),
            dispatch,
            owner="replica-test",
            bus=bus,
            clock=clock,
        )
        async with dispatcher:
            running = asyncio.create_task(dispatcher.run())
            try:
                with (
                    stamina.set_testing(instant_retries, attempts=100),
                    bus.subscribe(maxsize=10_000) as subscription,
                ):
                    yield Harness(dispatcher, real, flaky, directory, clock, subscription)
            finally:
                dispatcher.stop()
                await running
