"""The one way the tests wait for something they cannot be told about: poll with a deadline.

``eventually(read)`` calls ``read`` (a plain or an async function) until what it returns is true, and returns
that; ``until=`` tests the value instead, so the failure message shows the last value read. At the deadline
the test fails with ``what`` and that last value. Never a bare ``sleep``: a condition that holds at once costs
nothing, and one that never holds fails at a known time with a message that says what was awaited.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_INTERVAL_S = 0.02


def _failure(what: str, within: float, last: object) -> AssertionError:
    return AssertionError(f"{what} did not happen within {within} s; last seen: {last!r}"[:2000])


async def eventually(
    read: Callable[[], Any],
    *,
    until: Callable[[Any], object] = bool,
    within: float = DEFAULT_TIMEOUT_S,
    interval: float = DEFAULT_INTERVAL_S,
    what: str = "the awaited condition",
) -> Any:
    """Poll ``read()`` (awaited when it returns an awaitable) until ``until(value)`` holds; return the value."""
    deadline = time.monotonic() + within
    while True:
        value = read()
        if inspect.isawaitable(value):
            value = await value
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise _failure(what, within, value)
        await asyncio.sleep(interval)


def eventually_blocking(
    read: Callable[[], Any],
    *,
    until: Callable[[Any], object] = bool,
    within: float = DEFAULT_TIMEOUT_S,
    interval: float = DEFAULT_INTERVAL_S,
    what: str = "the awaited condition",
) -> Any:
    """``eventually`` for synchronous tests and threads, which have no event loop to yield to."""
    deadline = time.monotonic() + within
    while True:
        value = read()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise _failure(what, within, value)
        time.sleep(interval)
