"""The services the HTTP edge works with, built once by the composition root and handed to every route.

:class:`Services` is one typed, immutable object. What a deployment may lack is typed as optional — the bus
(live events), the output store, the worker manager, the dispatcher's previews — and checked in one place
(``http.deps``). The worker manager and the dispatcher are seen through the narrow protocols below: the HTTP
edge needs a handful of their methods, not their classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from comfyfleet.config import PoolConfig, Settings
from comfyfleet.domain import Worker
from comfyfleet.events import EventBus
from comfyfleet.http.auth import KeyRing
from comfyfleet.models.service import ModelService
from comfyfleet.outputs import OutputStore
from comfyfleet.store import Store
from comfyfleet.tasks import StartEstimator, TaskService, WorkerCatalogue


class FleetControl(Protocol):
    """What the API asks of the worker manager: its pools, its fresh copies of workers, drain, undrain and
    remove."""

    @property
    def pools(self) -> Mapping[str, PoolConfig]: ...

    def workers(self, *, pool: str | None = None) -> list[Worker]: ...

    async def drain(self, worker_id: str) -> Worker: ...

    async def undrain(self, worker_id: str) -> Worker: ...

    async def remove(self, worker_id: str) -> Worker: ...


class PreviewSource(Protocol):
    """The newest preview image a running task's worker sent: ``(image, content type, sequence)``."""

    def latest_preview(self, task_id: str) -> tuple[bytes, str, int] | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Services:
    settings: Settings
    store: Store
    tasks: TaskService
    keyring: KeyRing
    start_estimator: StartEstimator
    catalogue: WorkerCatalogue
    bus: EventBus | None = None
    outputs: OutputStore | None = None
    fleet: FleetControl | None = None
    previews: PreviewSource | None = None
    models: ModelService | None = None

    @classmethod
    def build(
        cls,
        settings: Settings,
        store: Store,
        *,
        bus: EventBus | None = None,
        outputs: OutputStore | None = None,
        fleet: FleetControl | None = None,
        previews: PreviewSource | None = None,
        models: ModelService | None = None,
    ) -> Services:
        """The services over an open ``store``; the task service, key ring, catalogue and start estimator
        are built here from the settings."""
        catalogue = WorkerCatalogue(store, outputs=outputs)
        return cls(
            settings=settings,
            store=store,
            tasks=TaskService(settings, store, bus=bus, catalogue=catalogue, models=models),
            keyring=KeyRing(settings.api_keys),
            start_estimator=StartEstimator(store, settings, models),
            catalogue=catalogue,
            bus=bus,
            outputs=outputs,
            fleet=fleet,
            previews=previews,
            models=models,
        )
