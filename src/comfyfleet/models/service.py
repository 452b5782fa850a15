"""The facade of models on demand: what the fleet (pool manifests at start-up), the dispatcher (a task's
models before its prompt), the task service (checks at the door) and the API (``/api/v1/models``) use.

One :class:`ModelService` per control-plane process serves the host it runs on: its cache, and the models
folders of the workers whose folders live on this host (``process`` workers, and containers that mount them).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import socket
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import httpx
import stamina

from comfyfleet.models import links
from comfyfleet.models.cache import ModelCache
from comfyfleet.models.links import WorkerPaths
from comfyfleet.models.sources import (
    PRIVATE_HINT,
    AssetReader,
    AssetSource,
    HttpSource,
    PartFile,
    Progress,
    S3Source,
    Source,
)
from comfyfleet.models.spec import (
    ModelFetchError,
    ModelFetchExhausted,
    ModelPolicy,
    ModelRejected,
    ModelSpec,
)
from comfyfleet.net import UnsafeAddress, pin_public_address

if TYPE_CHECKING:
    from comfyfleet.config import ModelSettings

logger = logging.getLogger(__name__)

ProvisionProgress = Callable[[dict[str, Any]], None]
WORKER_TOKEN_PREFIX = "cfw."
RECENT_FETCHES = 20  # downloads the estimate of a task's start takes the mean of


class ModelService:
    """An async context manager: entering it checks the cache (re-hashes every file)."""

    def __init__(
        self,
        settings: ModelSettings,
        *,
        assets: AssetReader | None = None,
        http: httpx.AsyncClient | None = None,
        host: str | None = None,
    ) -> None:
        self.settings = settings
        self.host = host or socket.gethostname()
        self.workers_dir = Path(settings.workers_dir)
        self.cache = ModelCache(
            Path(settings.cache_dir), budget_bytes=settings.cache_budget_bytes, on_evict=self._unlink_evicted
        )
        timeout = httpx.Timeout(settings.fetch_timeout_s, connect=min(10.0, settings.fetch_timeout_s))
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._own_http = http is None
        self._sources: dict[str, Source] = {
            "http": HttpSource(self._http, max_bytes=settings.max_file_bytes),
            "https": HttpSource(self._http, max_bytes=settings.max_file_bytes),
            "s3": S3Source(max_bytes=settings.max_file_bytes),
            "asset": AssetSource(assets),
        }
        self._names: dict[str, set[str]] = {}  # sha256 -> "folder/name" it was asked under
        self._links: dict[str, set[Path]] = {}  # sha256 -> worker files linked to it
        self._fetching: dict[str, tuple[int, int | None]] = {}  # sha256 -> bytes so far, total
        self._recent_fetch_s: deque[float] = deque(maxlen=RECENT_FETCHES)

    async def __aenter__(self) -> Self:
        kept, removed = await self.cache.check()
        logger.info("model_cache_checked dir=%s files=%d removed=%d", self.cache.root, kept, removed)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._own_http:
            await self._http.aclose()

    # -- at the door ------------------------------------------------------------------------------------------

    async def check_request(self, specs: list[ModelSpec], policy: ModelPolicy) -> None:
        """Refuse (:class:`ModelRejected`) what can never be fetched under ``policy``: a pickle format it does
        not allow, a URL whose host is not public when it allows none, two files under one name."""
        seen: dict[str, str] = {}
        for index, spec in enumerate(specs):
            policy.check_format(spec, index)
            if seen.setdefault(spec.path, spec.sha256) != spec.sha256:
                raise ModelRejected(f"model {spec.path} is named twice with different sha256", index)
            if spec.url.startswith(("http://", "https://")) and not self.cache.holds(spec.sha256):
                try:
                    await pin_public_address(
                        spec.url, allow_private=policy.allow_private, label="model URL", hint=PRIVATE_HINT
                    )
                except UnsafeAddress as exc:
                    raise ModelRejected(str(exc), index) from exc

    # -- fetching and linking ---------------------------------------------------------------------------------

    async def ensure(self, spec: ModelSpec, policy: ModelPolicy, progress: Progress | None = None) -> Path:
        """The verified cached file of ``spec``, downloaded once for this host however many ask."""
        policy.check_format(spec)
        self._names.setdefault(spec.sha256, set()).add(spec.path)
        stop = self.cache.progress(spec.sha256, progress) if progress is not None else None
        try:
            return await self.cache.get(
                spec.sha256, lambda part, report: self._fill(spec, policy, part, report)
            )
        finally:
            if stop is not None:
                stop()

    async def _fill(self, spec: ModelSpec, policy: ModelPolicy, part: PartFile, report: Progress) -> None:
        source = self._sources[spec.url.partition("://")[0]]

        def tracked(done: int, total: int | None) -> None:
            self._fetching[spec.sha256] = (done, total)
            report(done, total)

        started = time.monotonic()
        try:
            async for attempt in stamina.retry_context(
                on=ModelFetchError,
                attempts=self.settings.fetch_attempts,
                wait_initial=self.settings.fetch_retry_base_s,
                wait_max=30.0,
                timeout=None,
            ):
                with attempt:
                    if attempt.num > 1:
                        logger.info(
                            "model_fetch_retry sha256=%s try=%d from=%d", spec.sha256, attempt.num, part.size
                        )
                    await source.fill(spec, part, allow_private=policy.allow_private, progress=tracked)
        except ModelFetchError as exc:
            raise ModelFetchExhausted(
                f"model {spec.path}: gave up after {self.settings.fetch_attempts} tries: {exc}"
            ) from exc
        finally:
            self._fetching.pop(spec.sha256, None)
        self._recent_fetch_s.append(time.monotonic() - started)

    def fetch_estimate_s(self, hashes: Iterable[str]) -> float:
        """Seconds the files among ``hashes`` that the host lacks would take to fetch, from the mean of the
        host's recent downloads (0 when all are here or nothing was downloaded yet)."""
        missing = sum(1 for sha256 in hashes if not self.cache.holds(sha256))
        if not missing or not self._recent_fetch_s:
            return 0.0
        return missing * statistics.fmean(self._recent_fetch_s)

    async def provision(
        self,
        specs: list[ModelSpec],
        models_dir: Path,
        policy: ModelPolicy,
        progress: ProvisionProgress | None = None,
    ) -> None:
        """Put every file of ``specs`` in ``models_dir`` (a worker's ComfyUI ``models`` folder), fetching what
        the host lacks. ``progress`` gets ``{files, done_files, bytes, total_bytes, current}`` as it goes.
        Raises :class:`ModelUnavailable` for a file that cannot be had."""
        state: dict[str, Any] = {"files": len(specs), "done_files": 0, "bytes": 0, "total_bytes": None}
        for spec in specs:
            if links.holds(models_dir, spec.folder, spec.name, self.cache.path(spec.sha256)):
                self.cache.touch(spec.sha256)
                state["done_files"] += 1
                continue
            state["current"] = spec.path

            def report(done: int, total: int | None) -> None:
                state["bytes"], state["total_bytes"] = done, total
                if progress is not None:
                    progress(dict(state))

            cached = await self.ensure(spec, policy, report)
            linked = links.link_file(cached, models_dir, spec.folder, spec.name)
            self._links.setdefault(spec.sha256, set()).add(linked)
            state["done_files"] += 1
            if progress is not None:
                progress(dict(state))

    def _unlink_evicted(self, sha256: str) -> None:
        """An evicted file leaves the worker folders it was linked into (else its bytes would stay on disk)."""
        for path in self._links.pop(sha256, set()):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- what placement and the API see ------------------------------------------------------------------------

    def worker_paths(self, worker_id: str) -> WorkerPaths:
        return links.worker_paths(self.workers_dir, worker_id)

    def on_host(self, sha256: str) -> bool:
        return self.cache.holds(sha256)

    def pin(self, holder: str, specs: Iterable[ModelSpec]) -> None:
        self.cache.pin(holder, (spec.sha256 for spec in specs))

    def unpin(self, holder: str) -> None:
        self.cache.unpin(holder)

    def blob_path(self, sha256: str) -> Path | None:
        """The verified cached file, for the blob route (remote workers pull from here)."""
        if not self.cache.holds(sha256):
            return None
        self.cache.touch(sha256)
        return self.cache.path(sha256)

    def worker_token(self, worker_id: str) -> str:
        """The token a worker (the companion beside a remote ComfyUI) presents to pull blobs:
        ``cfw.<worker_id>.<hmac>``, signed with this host's secret (``<cache>/blob-secret``)."""
        signature = hmac.new(self._secret(), worker_id.encode(), hashlib.sha256).hexdigest()
        return f"{WORKER_TOKEN_PREFIX}{worker_id}.{signature}"

    def worker_of_token(self, token: str) -> str | None:
        """The worker a token was made for, or None when it is not one of this host's tokens."""
        if not token.startswith(WORKER_TOKEN_PREFIX):
            return None
        worker_id, _, _ = token.removeprefix(WORKER_TOKEN_PREFIX).rpartition(".")
        return worker_id if worker_id and hmac.compare_digest(self.worker_token(worker_id), token) else None

    def _secret(self) -> bytes:
        path = self.cache.root / "blob-secret"
        if not path.exists():
            temporary = path.with_name(f".blob-secret.{os.getpid()}")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(32))
            try:
                os.link(temporary, path)  # atomic, and the first process of the host to get there wins
            except FileExistsError:
                pass
            finally:
                temporary.unlink()
        return path.read_bytes()

    def snapshot(self) -> dict[str, Any]:
        """This host's cache: use, budget, each file (size, last use, pinned, names, workers linked)."""
        files = self.cache.files()
        entries = []
        for file in files:
            workers = sorted({path.parent.parent.parent.name for path in self._links.get(file.sha256, ())})
            entries.append(
                {
                    "sha256": file.sha256,
                    "size": file.size,
                    "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(file.last_used)),
                    "pinned": file.pinned,
                    "names": sorted(self._names.get(file.sha256, ())),
                    "workers": workers,
                }
            )
        return {
            "host": self.host,
            "used_bytes": sum(file.size for file in files),
            "budget_bytes": self.cache.budget_bytes,
            "files": entries,
            "fetching": [
                {
                    "sha256": sha,
                    "bytes": done,
                    "total_bytes": total,
                    "names": sorted(self._names.get(sha, ())),
                }
                for sha, (done, total) in self._fetching.items()
            ],
        }
