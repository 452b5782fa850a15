"""What the fleet's ComfyUI servers offer: their ``object_info`` (node catalogue) and ``system_stats``.

Read from the workers that are up (the store's worker records), merged (a node class any worker has is
known, and a model any worker has is listed), and cached for a while: the task service checks submissions
against it as ComfyUI would (``GraphCheck.FLEET``: every gateway ``POST /prompt``), ``/api/v1/workflows/validate``
reports against it, and the gateway answers ``/object_info`` from it. With no worker up (a pool scaled to
zero) the last catalogue seen is kept, also on disk (the output store) for the next start; before any,
submissions get structural checks only.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from comfyfleet.comfy.client import ComfyClient
from comfyfleet.comfy.errors import ComfyError
from comfyfleet.comfy.workflow import MODEL_INPUTS
from comfyfleet.domain import Worker, WorkerState
from comfyfleet.outputs import OutputNotFound, OutputsError, OutputStore
from comfyfleet.store import Store, StoreError

logger = logging.getLogger(__name__)

OBJECT_INFO_TTL_S = 300.0
_KEPT_FOLDER, _KEPT_NAME = "_catalogue", "object_info.json"
SYSTEM_STATS_TTL_S = 5.0
FETCH_TIMEOUT_S = 10.0
# How long the list of live workers is reused: every submission checked against the catalogue would otherwise
# read (and decode) every worker record; a worker that comes or goes is seen this much later at most.
LIVE_WORKERS_TTL_S = 1.0

ClientFactory = Callable[[str], ComfyClient]


def _default_client(endpoint: str) -> ComfyClient:
    return ComfyClient(endpoint, events=False, timeout=FETCH_TIMEOUT_S)


def merge_object_info(catalogues: list[dict[str, Any]]) -> dict[str, Any]:
    """One catalogue for several servers: a node class any of them has is known (the first one's description),
    and a model input lists the model files found on any of them."""
    merged: dict[str, Any] = {}
    for catalogue in catalogues:
        for name, info in catalogue.items():
            if name not in merged:
                merged[name] = copy.deepcopy(info)
            else:
                _add_model_options(merged[name], info)
    return merged


def _model_options(info: Any) -> dict[str, list[Any]]:
    """``input name → its option list`` for the model inputs of one node description (both spec styles:
    ``[[options…], {…}]`` and ``["COMBO", {"options": [...]}]``)."""
    found: dict[str, list[Any]] = {}
    inputs = info.get("input") if isinstance(info, dict) else None
    for category in ("required", "optional"):
        specs = inputs.get(category) if isinstance(inputs, dict) else None
        if not isinstance(specs, dict):
            continue
        for input_name, spec in specs.items():
            if input_name not in MODEL_INPUTS or not isinstance(spec, list) or not spec:
                continue
            if isinstance(spec[0], list):
                found[input_name] = spec[0]
            elif spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
                options = spec[1].get("options")
                if isinstance(options, list):
                    found[input_name] = options
    return found


def _add_model_options(target: Any, other: Any) -> None:
    theirs = _model_options(other)
    for input_name, options in _model_options(target).items():
        options.extend(value for value in theirs.get(input_name, ()) if value not in options)


class WorkerCatalogue:
    """``outputs``, when given, keeps the last merged catalogue (``_catalogue/object_info.json``), so a restart
    with every pool scaled to zero still knows the nodes and models its workers offer."""

    def __init__(
        self, store: Store, *, outputs: OutputStore | None = None, client_factory: ClientFactory | None = None
    ) -> None:
        self._store = store
        self._outputs = outputs
        self._saved_read = outputs is None  # the kept catalogue is read once, when no worker is up
        self._client_factory = client_factory or _default_client
        self._object_info: dict[str, tuple[float, dict[str, Any]]] = {}  # endpoint -> (fetched, info)
        self._merged: dict[str, Any] | None = None
        self._merged_from: tuple[str, ...] = ()
        self._stats: tuple[float, list[tuple[Worker, dict[str, Any]]]] | None = None
        self._live: tuple[float, list[Worker]] | None = None
        self._lock = asyncio.Lock()

    async def _live_workers(self) -> list[Worker]:
        now = time.monotonic()
        if self._live is not None and now - self._live[0] < LIVE_WORKERS_TTL_S:
            return self._live[1]
        try:
            workers = await self._store.list_workers()
        except StoreError:
            return []
        live = [w for w in workers if w.state in (WorkerState.IDLE, WorkerState.BUSY) and w.endpoint]
        self._live = (now, live)
        return live

    async def _fetch(self, endpoint: str, what: str) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(FETCH_TIMEOUT_S), self._client_factory(endpoint) as client:
                data = await (client.object_info() if what == "object_info" else client.system_stats())
        except (ComfyError, TimeoutError, OSError) as exc:
            logger.info("worker_catalogue_fetch_failed endpoint=%s what=%s error=%s", endpoint, what, exc)
            return None
        return data if isinstance(data, dict) else None

    async def object_info(self) -> dict[str, Any] | None:
        """The merged node catalogue of the live workers; None when no worker was ever reachable."""
        async with self._lock:
            workers = await self._live_workers()
            now = time.monotonic()
            endpoints = sorted({w.endpoint for w in workers if w.endpoint})
            stale = [
                e
                for e in endpoints
                if e not in self._object_info or now - self._object_info[e][0] > OBJECT_INFO_TTL_S
            ]
            if stale:
                fetched = await asyncio.gather(*(self._fetch(endpoint, "object_info") for endpoint in stale))
                for endpoint, info in zip(stale, fetched, strict=True):
                    if info is not None:
                        self._object_info[endpoint] = (now, info)
            current = tuple(e for e in endpoints if e in self._object_info)
            if current and (current != self._merged_from or stale):
                self._merged = merge_object_info([self._object_info[endpoint][1] for endpoint in current])
                self._merged_from = current
                await self._keep(self._merged)
            elif self._merged is None and not self._saved_read:
                self._merged = await self._kept()
            # Workers gone for good are forgotten, but the last merge stays for a fleet scaled to zero.
            for endpoint in [e for e in self._object_info if e not in endpoints]:
                del self._object_info[endpoint]
            return self._merged

    async def _keep(self, merged: dict[str, Any]) -> None:
        self._saved_read = True  # what workers answer now wins over what was kept
        if self._outputs is None:
            return
        data = json.dumps(merged, separators=(",", ":")).encode()

        async def chunks() -> AsyncIterator[bytes]:
            yield data

        try:
            await self._outputs.put(_KEPT_FOLDER, _KEPT_NAME, chunks(), "application/json")
        except OutputsError as exc:
            logger.warning("worker_catalogue_keep_failed error=%s", exc)

    async def _kept(self) -> dict[str, Any] | None:
        self._saved_read = True
        if self._outputs is None:
            return None
        try:
            data = b"".join([chunk async for chunk in self._outputs.read(_KEPT_FOLDER, _KEPT_NAME)])
            kept = json.loads(data)
        except OutputNotFound:
            return None
        except (OutputsError, ValueError) as exc:
            logger.warning("worker_catalogue_unreadable error=%s", exc)
            return None
        logger.info("worker_catalogue_restored node_types=%d", len(kept) if isinstance(kept, dict) else 0)
        return kept if isinstance(kept, dict) else None

    async def system_stats(self) -> list[tuple[Worker, dict[str, Any]]]:
        """``(worker, its /system_stats)`` for every live worker that answered, cached for a few seconds."""
        now = time.monotonic()
        if self._stats is not None and now - self._stats[0] < SYSTEM_STATS_TTL_S:
            return self._stats[1]
        workers = await self._live_workers()
        answers = await asyncio.gather(*(self._fetch(w.endpoint or "", "system_stats") for w in workers))
        stats = [
            (worker, answer) for worker, answer in zip(workers, answers, strict=True) if answer is not None
        ]
        self._stats = (now, stats)
        return stats

    def forget(self) -> None:
        with contextlib.suppress(Exception):
            self._object_info.clear()
        self._merged, self._merged_from, self._stats, self._live = None, (), None, None
