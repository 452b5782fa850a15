"""Work started without the caller waiting for it (a wake-up, a relayed event, a checkpoint, a batched delete),
kept until it ends: asyncio holds only a weak reference to a running task, so one started and dropped may be
collected before it finishes."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Background:
    """The tasks one owner started and has not seen end."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, cancel_after_s: float | None = None) -> None:
        """Wait for what is running; what still runs after ``cancel_after_s`` seconds is cancelled."""
        pending = set(self._tasks)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=cancel_after_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
