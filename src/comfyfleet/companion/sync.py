"""Pull a manifest's files from the control plane into a local models folder.

The work is the host cache's (:mod:`comfyfleet.models`), pointed at another source: each spec's URL becomes
the control plane's blob route for its sha256, and the requests carry the worker's token. So the companion
gets the same guarantees as a control-plane host: a ``.part`` file resumed with ``Range`` after a cut, the
bytes hashed as they stream and refused on a mismatch, an atomic rename into ``cache/sha256/…``, one
download per file however often the companion is restarted, and hard links into ``models/<folder>/<name>``.

Layout under the companion's folder (``--dir``)::

    cache/sha256/<ab>/<sha256>      verified files
    cache/partial/<sha256>.part     a download in progress (resumed by the next run)
    models/<folder>/<name>          what ComfyUI sees (hard links into cache/)
    extra_model_paths.yaml          for ``main.py --extra-model-paths-config``
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx

from comfyfleet.config import ModelSettings
from comfyfleet.models import ModelPolicy, ModelsError, ModelSpec
from comfyfleet.models.links import WorkerPaths
from comfyfleet.models.service import ModelService, ProvisionProgress

logger = logging.getLogger(__name__)

# The control plane checked the pool's rules (formats, addresses) before it let a file into its store; the
# companion only ever talks to the control plane, whatever address that has.
_TRUSTED = ModelPolicy(allow_pickle=True, allow_private=True)


class CompanionError(Exception):
    """A file of the manifest could not be had (final: the reason says why); ComfyUI is not started."""


def blob_url(control_plane: str, sha256: str) -> str:
    return f"{control_plane.rstrip('/')}/api/v1/models/blobs/{sha256}"


async def _wait_until_held(http: httpx.AsyncClient, url: str, deadline: float, wait_s: float) -> None:
    """Until the control plane serves ``url`` (it may still be fetching the file, or starting)."""
    pause = 0.2
    while True:
        try:
            async with http.stream("GET", url, headers={"Range": "bytes=0-0"}) as response:
                status: int | str = response.status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__  # the control plane is not answering (yet)
        if status in (200, 206):
            return
        if status in (401, 403):
            raise CompanionError(f"the control plane refused this worker's token (HTTP {status}) for {url}")
        if time.monotonic() > deadline:
            raise CompanionError(
                f"the control plane did not serve {url} within {wait_s:g}s (last answer: {status})"
            )
        logger.info("companion_waiting url=%s answer=%s", url, status)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 5.0)


async def sync_models(
    control_plane: str,
    token: str,
    root: Path,
    specs: list[ModelSpec],
    *,
    attempts: int = 5,
    retry_base_s: float = 1.0,
    timeout_s: float = 60.0,
    wait_s: float = 600.0,
    progress: ProvisionProgress | None = None,
) -> WorkerPaths:
    """Make ``root/models`` (``root`` absolute) hold every file of ``specs``; returns the folder's paths. Files
    already there (verified by an earlier run) are not fetched again. The control plane fetches a pool's
    manifest into its own cache while the worker boots, so a file it does not hold yet (404) is waited for, up
    to ``wait_s``. Raises :class:`CompanionError`."""
    settings = ModelSettings(
        cache_dir=str(root / "cache"),
        workers_dir=str(root.parent),
        fetch_attempts=attempts,
        fetch_retry_base_s=retry_base_s,
        fetch_timeout_s=timeout_s,
        cache_budget_bytes=2**62,  # the manifest is what this worker needs: never evict from it
    )
    timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))
    headers = {"Authorization": f"Bearer {token}"}
    from_store = [spec.model_copy(update={"url": blob_url(control_plane, spec.sha256)}) for spec in specs]
    async with (
        httpx.AsyncClient(headers=headers, timeout=timeout) as http,
        ModelService(settings, http=http) as service,
    ):
        paths = service.worker_paths(root.name)
        deadline = time.monotonic() + wait_s
        for spec in from_store:
            if not service.cache.holds(spec.sha256):
                await _wait_until_held(http, spec.url, deadline, wait_s)
        try:
            await service.provision(from_store, paths.models_dir, _TRUSTED, progress)
        except ModelsError as exc:
            raise CompanionError(str(exc)) from exc
    for spec in specs:
        logger.info("companion_model_ready path=%s sha256=%s", spec.path, spec.sha256)
    return paths
