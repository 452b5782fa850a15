"""Writes made a batch at a time: the ones that arrive while a batch is being written go together in the next,
one statement and one commit for all (PostgreSQL's answer to SQLite's group commit, see ``_sqlite_threads``):
submissions, and the notifications that wake dispatchers and relay live events. Each caller is answered once
its own write is committed, so nothing it was told is stored can be lost; a batch that fails is tried again
item by item, in order, so only the caller whose item is at fault hears of it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from comfyfleet.store.base import StoreUnavailable

Item = TypeVar("Item")
Result = TypeVar("Result")

MAX_BATCH = 256


class Batcher(Generic[Item, Result]):
    """``submit(item)`` through ``write_many`` (every item of a batch, results in the same order), or through
    ``write_one`` for each item of a batch ``write_many`` refused."""

    def __init__(
        self,
        write_many: Callable[[list[Item]], Awaitable[list[Result]]],
        write_one: Callable[[Item], Awaitable[Result]],
    ) -> None:
        self._write_many = write_many
        self._write_one = write_one
        self._queued: list[tuple[Item, asyncio.Future[Result]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queued.append((item, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_queued(), name="comfyfleet-store-batch")
        # A caller that stops waiting cancels only its own answer: the batch its row is in goes on.
        return await future

    async def close(self) -> None:
        """Stop writing (the store closes): whoever still waits hears that the store went away."""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    async def _write_queued(self) -> None:
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        try:
            while self._queued:
                batch, self._queued = self._queued[:MAX_BATCH], self._queued[MAX_BATCH:]
                await self._write(batch)
                batch = []
        except asyncio.CancelledError:
            gone = StoreUnavailable("the store closed before the task was known to be stored")
            for _, future in [*batch, *self._queued]:
                _fail(future, gone)
            self._queued = []
            raise
        finally:
            self._writer = None

    async def _write(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        items = [item for item, _ in batch]
        try:
            results = await self._write_many(items) if len(items) > 1 else [await self._write_one(items[0])]
        except Exception as exc:
            if len(items) == 1:
                _fail(batch[0][1], exc)
                return
            for item, future in batch:  # in order, so the rows keep the order they came in
                await self._write_alone(item, future)
            return
        for (_, future), result in zip(batch, results, strict=True):
            _succeed(future, result)

    async def _write_alone(self, item: Item, future: asyncio.Future[Result]) -> None:
        try:
            result = await self._write_one(item)
        except Exception as exc:
            _fail(future, exc)
        else:
            _succeed(future, result)


def _succeed(future: asyncio.Future[Result], result: Result) -> None:
    if not future.done():  # the caller stopped waiting; its row stands
        future.set_result(result)


def _fail(future: asyncio.Future[Result], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
