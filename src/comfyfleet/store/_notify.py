"""In-process fan-out of wake-ups to every ``listen()`` iterator of one store (both backends deliver their own
notifications through it; PostgreSQL also feeds it what other replicas send)."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from typing import Self

from comfyfleet.store.base import Notification, StoreClosed

logger = logging.getLogger("comfyfleet.store")

# A subscriber that stops reading loses its oldest wake-ups rather than growing without bound.
SUBSCRIPTION_BACKLOG = 10_000


class Subscription:
    """One ``listen()`` iterator. It is registered when created, so nothing published after ``listen()``
    returns is missed even before the first ``__anext__``. ``aclose()`` (or ``async with``) unsubscribes."""

    __slots__ = ("__weakref__", "_backlog", "_closed", "_hub", "_wakeup")

    def __init__(self, hub: NotificationHub) -> None:
        self._hub = hub
        self._backlog: deque[Notification] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False

    def _offer(self, notification: Notification) -> None:
        if len(self._backlog) >= SUBSCRIPTION_BACKLOG:
            self._backlog.popleft()
            logger.warning("notification_dropped channel=%s", notification.channel)
        self._backlog.append(notification)
        self._wakeup.set()

    def _end(self) -> None:
        self._closed = True
        self._wakeup.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Notification:
        while not self._backlog:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._backlog.popleft()

    async def aclose(self) -> None:
        self._hub.unsubscribe(self)
        self._end()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class NotificationHub:
    """In-process fan-out of notifications to every live subscription of one store."""

    def __init__(self) -> None:
        # Weak, so a subscription its owner dropped without closing does not pile up wake-ups forever.
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._closed = False

    def subscribe(self) -> Subscription:
        if self._closed:
            raise StoreClosed("the store is closed")
        subscription = Subscription(self)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    def publish(self, notification: Notification) -> None:
        for subscription in list(self._subscriptions):
            subscription._offer(notification)

    def close(self) -> None:
        """End every subscription's iteration."""
        self._closed = True
        for subscription in list(self._subscriptions):
            subscription._end()
        self._subscriptions.clear()
