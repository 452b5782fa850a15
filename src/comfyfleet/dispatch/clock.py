"""The dispatcher's sense of time, injectable so the timeout, grace and retry rules can be tested without
waiting for them."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (for deadlines and intervals)."""

    def now(self) -> datetime:
        """The wall time, timezone-aware UTC (for timestamps and retry times stored with a task)."""

    async def sleep(self, seconds: float) -> None:
        """Return once ``seconds`` of :meth:`monotonic` time have passed."""


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
