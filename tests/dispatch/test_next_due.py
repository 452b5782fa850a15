"""The retry timer's due time: read from the store when it is needed, not on every wake-up, and brought forward
by the retries the tasks channel announces."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta

from comfyfleet.dispatch.due import NextDue

from .fakes import FakeClock


class CountingQueue:
    """The one read ``NextDue`` makes, with what the store would answer and how often it was asked."""

    def __init__(self, due: datetime | None = None) -> None:
        self.due = due
        self.reads = 0
        self.during_read: list[Callable[[], None]] = []

    async def next_due_at(self) -> datetime | None:
        self.reads += 1
        for happen in self.during_read:  # e.g. an announcement arriving while the read is on its way
            happen()
        return self.due


def announcement(when: datetime) -> str:
    return json.dumps({"task_id": "t", "not_before": when.isoformat()})


async def test_the_store_is_read_once_per_refresh_not_per_wake_up() -> None:
    clock = FakeClock()
    store = CountingQueue(clock.now() + timedelta(seconds=60))
    due = NextDue(store, clock, refresh_s=5.0)  # type: ignore[arg-type]
    for _ in range(100):  # a busy queue: a wake-up per submission
        assert await due.limit(5.0) == 5.0
    assert store.reads == 1
    clock.advance(5.0)
    await due.limit(5.0)
    assert store.reads == 2


async def test_an_announced_retry_brings_the_timer_forward_without_a_read() -> None:
    clock = FakeClock()
    store = CountingQueue(None)
    due = NextDue(store, clock, refresh_s=5.0)  # type: ignore[arg-type]
    assert await due.limit(5.0) == 5.0
    due.heard(announcement(clock.now() + timedelta(seconds=1.5)))
    due.heard(json.dumps({"task_id": "u"}))  # a submission says nothing of time
    due.heard(announcement(clock.now() + timedelta(seconds=3)))  # later than what is known: no change
    assert await due.limit(5.0) == 1.5
    assert store.reads == 1
    # Once it has passed, the store says what comes next.
    clock.advance(2.0)
    store.due = clock.now() + timedelta(seconds=0.5)
    assert await due.limit(5.0) == 0.5
    assert store.reads == 2


async def test_a_retry_heard_while_the_store_is_read_is_kept() -> None:
    clock = FakeClock()
    store = CountingQueue(None)
    due = NextDue(store, clock, refresh_s=5.0)  # type: ignore[arg-type]
    store.during_read.append(lambda: due.heard(announcement(clock.now() + timedelta(seconds=2))))
    assert await due.limit(5.0) == 2.0


async def test_unreadable_announcements_are_ignored() -> None:
    clock = FakeClock()
    due = NextDue(CountingQueue(None), clock, refresh_s=5.0)  # type: ignore[arg-type]
    for payload in (
        '{"not_before": "soon"}',
        '{"not_before": 3}',
        "not json",
        '{"not_before": "2026-01-01T00:00:00"}',
    ):
        due.heard(payload)
    assert await due.limit(5.0) == 5.0
