"""The wake-ups the fleet's parts give each other, and the one stop event they all honour.

The registry, the prober and the reconciler never call into each other's loops: each loop waits on "its event
OR its timer OR stop", and the others set its event. :class:`FleetSignals` holds those events, the probe
schedule (which worker is due for a health check when) and the change signal the dispatcher waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

# Runs a coroutine as a named task of the fleet's task group; None (the coroutine closed) once it has stopped.
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None] | None"]


class FleetSignals:
    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.probe = asyncio.Event()
        self.reconcile = asyncio.Event()
        self.flush = asyncio.Event()
        self.timer = asyncio.Event()  # set only by stop_all(): a plain timer that still ends at shutdown
        self._changed = asyncio.Event()
        self._probe_due: dict[str, float] = {}  # worker id -> monotonic time of its next health check

    # -- the dispatcher's change signal ---------------------------------------------------------------------

    def changed(self) -> None:
        """The set of usable workers may have changed: wake every current waiter of :meth:`wait_changed`."""
        # Waiters of the current generation are woken; the next wait_changed() waits for a new change.
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    # -- the probe schedule ---------------------------------------------------------------------------------

    def probe_soon(self, worker_id: str) -> None:
        """Check this worker at the prober's next tick."""
        self._probe_due[worker_id] = 0.0
        self.probe.set()

    def probe_in(self, worker_id: str, delay_s: float) -> None:
        self._probe_due[worker_id] = time.monotonic() + delay_s

    def probe_due(self, worker_id: str, now: float) -> bool:
        return self._probe_due.get(worker_id, 0.0) <= now

    def forget(self, worker_id: str) -> None:
        self._probe_due.pop(worker_id, None)

    # -- loops ----------------------------------------------------------------------------------------------

    def stop_all(self) -> None:
        self.stop.set()
        for event in (self.probe, self.reconcile, self.flush, self.timer):
            event.set()

    async def wait(self, event: asyncio.Event, timeout_s: float) -> None:
        """Wait for ``event`` or ``timeout_s``, whichever comes first (``stop_all`` sets every event)."""
        if not event.is_set() and not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await event.wait()
        event.clear()
