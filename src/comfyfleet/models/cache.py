"""The host's model cache: one verified copy of each file, named by its sha256.

Layout under the cache directory::

    sha256/<ab>/<sha256>     complete, verified files (read-only to everyone; workers see hard links)
    partial/<sha256>.part    a download in progress, kept for a resume (never visible under sha256/)
    locks/<sha256>.lock      held (flock) by the one process of this host downloading that file

A file appears under ``sha256/`` only by an atomic rename after its bytes were verified while they streamed in,
so no reader ever sees half a file. Concurrent requests for one file coalesce: within a process on a future
per hash, across the processes of a host on the lock file. The disk budget is kept by evicting the least
recently used files (the cache sets each file's access time itself when it is used), never one that is
pinned: by a pool's manifest, or by a task queued or running on this host. At start every file is re-hashed
and one whose bytes do not match its name is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from comfyfleet import metrics
from comfyfleet.models.sources import PartFile, Progress
from comfyfleet.models.spec import ModelFetchExhausted, ModelUnavailable

logger = logging.getLogger(__name__)

Fill = Callable[[PartFile, Progress], Awaitable[None]]
_LOCK_POLL_MAX_S = 0.5


@dataclass(frozen=True, slots=True)
class CachedFile:
    sha256: str
    size: int
    last_used: float  # epoch seconds
    pinned: bool


class _Interrupted(Exception):
    """The coroutine downloading a file for others was cancelled: a waiter takes the download over."""


class ModelCache:
    """Use ``await cache.check()`` once at start, then :meth:`get`."""

    def __init__(
        self, root: Path, *, budget_bytes: int, on_evict: Callable[[str], None] | None = None
    ) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self._on_evict = on_evict
        self._inflight: dict[str, asyncio.Future[Path]] = {}
        self._listeners: dict[str, list[Progress]] = {}
        self._pins: dict[str, frozenset[str]] = {}  # holder (pool manifest, task id) -> hashes

    # -- paths ------------------------------------------------------------------------------------------------

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def part_path(self, sha256: str) -> Path:
        return self.root / "partial" / f"{sha256}.part"

    def holds(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def touch(self, sha256: str) -> None:
        """Mark the file used now (its access time is the LRU clock; mounts with noatime do not disturb it)."""
        with contextlib.suppress(FileNotFoundError):
            stat = self.path(sha256).stat()
            os.utime(self.path(sha256), (time.time(), stat.st_mtime))

    # -- pins -------------------------------------------------------------------------------------------------

    def pin(self, holder: str, hashes: Iterable[str]) -> None:
        """Keep these files while ``holder`` (``pool:<name>``, ``task:<id>``) needs them."""
        self._pins[holder] = frozenset(hashes)

    def unpin(self, holder: str) -> None:
        self._pins.pop(holder, None)

    def pinned(self) -> frozenset[str]:
        return frozenset().union(*self._pins.values()) if self._pins else frozenset()

    # -- start-up check ---------------------------------------------------------------------------------------

    async def check(self) -> tuple[int, int]:
        """Create the layout; re-hash every file and remove those whose bytes do not match their name.
        Returns (files kept, files removed)."""
        for folder in ("sha256", "partial", "locks"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        return await asyncio.to_thread(self._check_files)

    def _check_files(self) -> tuple[int, int]:
        kept = removed = 0
        for path in self._files():
            if _sha256_of(path) == path.name:
                kept += 1
                continue
            logger.warning("model_cache_corrupt_removed sha256=%s", path.name)
            path.unlink(missing_ok=True)
            removed += 1
        for stray in (self.root / "sha256").glob("*/.*.tmp"):
            stray.unlink(missing_ok=True)
        return kept, removed

    def _files(self) -> Iterator[Path]:
        for path in (self.root / "sha256").glob("*/*"):
            if path.is_file() and not path.name.startswith("."):
                yield path

    # -- use --------------------------------------------------------------------------------------------------

    def files(self) -> list[CachedFile]:
        pinned = self.pinned()
        listed = []
        for path in self._files():
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                listed.append(CachedFile(path.name, stat.st_size, stat.st_atime, path.name in pinned))
        return sorted(listed, key=lambda file: file.last_used)

    def used_bytes(self) -> int:
        return sum(file.size for file in self.files())

    def progress(self, sha256: str, listener: Progress) -> Callable[[], None]:
        """Call ``listener`` as bytes of ``sha256`` arrive (from whichever request downloads it); returns
        the function that stops it."""
        self._listeners.setdefault(sha256, []).append(listener)

        def stop() -> None:
            with contextlib.suppress(ValueError, KeyError):
                self._listeners[sha256].remove(listener)

        return stop

    def _report(self, sha256: str, done: int, total: int | None) -> None:
        for listener in list(self._listeners.get(sha256, ())):
            listener(done, total)

    async def get(self, sha256: str, fill: Fill, *, size_hint: int = 0) -> Path:
        """The path of the verified file, downloading it with ``fill`` when this host lacks it. One download
        per file at a time, however many ask. Raises :class:`ModelUnavailable` (final) or whatever ``fill``
        raises when its retries are spent."""
        while True:
            if self.holds(sha256):
                self.touch(sha256)
                metrics.count_model_cache_hit()
                return self.path(sha256)
            running = self._inflight.get(sha256)
            if running is not None:
                try:
                    return await asyncio.shield(running)
                except _Interrupted:
                    continue  # its downloader was cancelled: take over
            future: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
            future.add_done_callback(_consume)
            self._inflight[sha256] = future
            try:
                path = await self._download(sha256, fill, size_hint)
            except asyncio.CancelledError:
                future.set_exception(_Interrupted())
                raise
            except BaseException as exc:
                future.set_exception(exc)
                raise
            else:
                future.set_result(path)
                return path
            finally:
                del self._inflight[sha256]

    async def _download(self, sha256: str, fill: Fill, size_hint: int) -> Path:
        async with self._host_lock(sha256):
            if self.holds(sha256):  # another process of this host finished it meanwhile
                self.touch(sha256)
                return self.path(sha256)
            self.make_room(size_hint)
            part = PartFile(self.part_path(sha256))
            await asyncio.to_thread(part.open)
            try:
                started = time.monotonic()
                resumed_at = part.size
                await fill(part, self._reporter(sha256))
                digest = await asyncio.to_thread(part.seal)
            except ModelFetchExhausted:
                raise  # what was fetched stays for a resume
            except ModelUnavailable:
                part.path.unlink(missing_ok=True)  # this source will not complete it
                raise
            finally:
                part.close()
                if part.size == 0:
                    part.path.unlink(missing_ok=True)
            if digest != sha256:
                part.path.unlink(missing_ok=True)
                raise ModelUnavailable(
                    f"the downloaded bytes have sha256 {digest}, not the {sha256} asked for"
                )
            final = self.path(sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(part.path, 0o444)
            os.replace(part.path, final)
            metrics.observe_model_fetch(part.size - resumed_at, time.monotonic() - started)
            logger.info("model_cached sha256=%s bytes=%d resumed_at=%d", sha256, part.size, resumed_at)
            self.make_room(0)
            return final

    def _reporter(self, sha256: str) -> Progress:
        """Progress for the listeners of ``sha256``; the first time the total is known, room is made for the
        whole file, so the cache stays within its budget while it streams in."""
        room_made = False

        def report(done: int, total: int | None) -> None:
            nonlocal room_made
            if not room_made and total is not None:
                room_made = True
                self.make_room(total)
            self._report(sha256, done, total)

        return report

    @contextlib.asynccontextmanager
    async def _host_lock(self, sha256: str) -> AsyncIterator[None]:
        """The one process of this host that may download ``sha256`` (flock, released if the process dies)."""
        path = self.root / "locks" / f"{sha256}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            wait = 0.02
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                await asyncio.sleep(wait)  # another process downloads it: look again soon
                wait = min(wait * 2, _LOCK_POLL_MAX_S)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- budget -----------------------------------------------------------------------------------------------

    def make_room(self, incoming: int) -> list[str]:
        """Evict least recently used, unpinned files until ``incoming`` more bytes fit the budget. Pinned files
        are never evicted, even when that leaves the cache over budget (logged)."""
        files = self.files()
        total = sum(file.size for file in files)
        evicted = []
        for file in files:
            if total + incoming <= self.budget_bytes:
                break
            if file.pinned or file.sha256 in self._inflight:
                continue
            self.path(file.sha256).unlink(missing_ok=True)
            total -= file.size
            evicted.append(file.sha256)
            metrics.count_model_eviction()
            logger.info("model_evicted sha256=%s bytes=%d", file.sha256, file.size)
            if self._on_evict is not None:
                self._on_evict(file.sha256)
        if total + incoming > self.budget_bytes:
            logger.warning(
                "model_cache_over_budget used=%d incoming=%d budget=%d (the rest is pinned)",
                total,
                incoming,
                self.budget_bytes,
            )
        return evicted


def _consume(future: asyncio.Future[Path]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a download nobody else waited for is not "never retrieved"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
