"""What the dispatcher sees of the fleet: the workers it may use now, and where to report trouble.

The worker manager (``fleet/manager.py``) implements :class:`WorkerDirectory`; the dispatcher only
depends on this protocol, so it runs the same over static URLs, local processes, containers or
cloud instances.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from comfyfleet.domain import Worker


class WorkerDirectory(Protocol):
    def usable_workers(self) -> Sequence[Worker]:
        """Workers in state ``idle`` or ``busy`` (health-probed, endpoint known), not draining."""

    def prefetch(self, worker: Worker) -> int:
        """How many prompts beyond the executing one this worker may hold (its pool's ``prefetch``)."""

    async def wait_changed(self) -> None:
        """Return when the set of usable workers may have changed (a worker became ready or went away)."""

    async def set_assignments(self, worker_id: str, task_ids: Sequence[str]) -> None:
        """The dispatcher's view of which tasks a worker holds: makes it ``busy`` or ``idle`` and
        stamps ``last_active_at``."""

    async def note_loaded_models(self, worker_id: str, models: Sequence[str]) -> None:
        """Models this worker has loaded (from graphs it ran), for model-aware placement."""

    async def report_unreachable(self, worker_id: str, reason: str) -> None:
        """The dispatcher could not talk to this worker; the manager probes it and fails it if dead."""

    async def recycle(self, worker_id: str, reason: str) -> None:
        """The worker is stuck (a prompt ignored an interrupt): replace it."""
