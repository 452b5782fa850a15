"""When the earliest task held back by a retry's back-off becomes runnable, without asking the store on every
wake-up (a busy queue wakes the dispatcher once per submission).

Only a retry gives a pending task a ``not_before``, and every retry announces itself on the tasks channel with
that time (``record.publish``), so the dispatcher hears of a new, earlier due time without a read. The store is
read again once the known time has passed and at least every ``refresh_s`` (a lost announcement, a task that
another replica took), as the loop's safety poll always did.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime

from comfyfleet.dispatch.clock import Clock
from comfyfleet.store import DispatchQueue, StoreError


class NextDue:
    def __init__(self, store: DispatchQueue, clock: Clock, refresh_s: float) -> None:
        self._store = store
        self._clock = clock
        self._refresh_s = refresh_s
        self._due: datetime | None = None
        self._read_at: float | None = None
        self._heard_while_reading: datetime | None = None

    async def get(self) -> datetime | None:
        """The earliest known due time (may raise the store's errors when it reads)."""
        stale = self._read_at is None or self._clock.monotonic() - self._read_at >= self._refresh_s
        if stale or (self._due is not None and self._due <= self._clock.now()):
            self._heard_while_reading = None
            read = await self._store.next_due_at()
            # A retry heard while the read was on its way may not be in what it found.
            self._due = _earliest(read, self._heard_while_reading)
            self._read_at = self._clock.monotonic()
        return self._due

    async def limit(self, wait_s: float) -> float:
        """``wait_s`` cut short at the earliest due time (left as it is while the store does not answer)."""
        with contextlib.suppress(StoreError):
            due = await self.get()
            if due is not None:
                return max(0.0, min(wait_s, (due - self._clock.now()).total_seconds()))
        return wait_s

    def heard(self, payload: str) -> None:
        """A tasks-channel announcement: one with ``not_before`` may bring the due time forward."""
        if '"not_before"' not in payload:
            return
        try:
            when = datetime.fromisoformat(json.loads(payload)["not_before"])
        except (ValueError, KeyError, TypeError):
            return
        if when.tzinfo is not None:
            self._due = _earliest(self._due, when)
            self._heard_while_reading = _earliest(self._heard_while_reading, when)


def _earliest(first: datetime | None, second: datetime | None) -> datetime | None:
    return min((when for when in (first, second) if when is not None), default=None)
