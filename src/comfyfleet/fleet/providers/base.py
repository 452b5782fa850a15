"""The provider protocol: where workers come from.

One provider object serves one pool (it is built from the pool's config and validates its ``settings`` at
construction, so a bad pool fails at start-up with a clear message). The manager records a worker in the
store as ``pending`` *before* calling :meth:`Provider.create`, and ``create`` returns as soon as the
provider-side id exists (before the worker is ready), so a crash at any point leaves either a record that
the next start rediscovers or an instance carrying our labels / name prefix that the reaper removes: never
a paid GPU nobody knows about.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

from pydantic import BaseModel, ValidationError

from comfyfleet.fleet.errors import FleetConfigError

if TYPE_CHECKING:
    from comfyfleet.config import PoolConfig

WORKER_ID_SUFFIX = re.compile(r"^[0-9a-f]{10}$")
SettingsModel = TypeVar("SettingsModel", bound=BaseModel)


class InstanceState(enum.StrEnum):
    """What the provider says about one instance (the manager's worker state is separate)."""

    PROVISIONING = "provisioning"  # created, not yet running (pulling, booting…)
    RUNNING = "running"  # running; its ComfyUI may still be starting: the manager probes it
    STOPPED = "stopped"  # exists but stopped (may still cost storage)
    FAILED = "failed"  # the provider reports a failure (statusError, exited container, dead process)
    GONE = "gone"  # no longer exists (or being deleted)
    UNKNOWN = "unknown"  # a state string this code does not know; not an error by itself


@dataclass(frozen=True, slots=True)
class ProviderHandle:
    """What :meth:`Provider.create` reports at once: the id to persist, and the endpoint if already known."""

    provider_id: str
    endpoint: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Instance:
    """One instance as the provider describes or lists it."""

    provider_id: str
    state: InstanceState
    worker_id: str | None = None  # from our label / name; None when the instance is not ours to know
    endpoint: str | None = None  # base URL of its ComfyUI when the provider knows it
    error: str | None = None  # the provider's own failure message (e.g. Novita's statusError)
    raw_state: str | None = None  # the provider's own word, for operators


class Provider(Protocol):
    """One pool's source of workers. An async context manager (it may hold a client or child processes)."""

    kind: str
    pool: str

    async def __aenter__(self) -> Self: ...
    async def __aexit__(self, *exc_info: object) -> None: ...

    async def create(self, worker_id: str) -> ProviderHandle:
        """Ask for a new instance for ``worker_id``; return once it has a provider-side id."""

    async def describe(self, provider_id: str) -> Instance:
        """Where the instance is and where its ComfyUI answers; ``GONE`` when it no longer exists."""

    async def terminate(self, provider_id: str) -> None:
        """Stop and remove the instance. Idempotent: an instance already gone is a success."""

    async def list_ours(self) -> list[Instance]:
        """Every instance of this pool that carries this installation's identity and our labels / name
        prefix, in any state but gone. Another installation's instances are never listed (the reaper would
        delete them)."""

    def adopt(self, provider_id: str, worker_id: str) -> None:
        """The manager keeps this existing instance (found in the store after a restart) for ``worker_id``."""

    @property
    def stops_with_control_plane(self) -> bool:
        """True when its workers cannot outlive comfyfleet usefully (child processes): the manager
        terminates them on a clean shutdown. Cloud instances and containers are left for the next start
        to adopt."""


def worker_id_from_name(name: str, prefix: str) -> str | None:
    """``<prefix><pool>-<10 hex>`` → the worker id, or None when the name is not ours (prefix and shape)."""
    if not name.startswith(prefix):
        return None
    worker_id = name[len(prefix) :]
    _, _, suffix = worker_id.rpartition("-")
    return worker_id if WORKER_ID_SUFFIX.match(suffix) else None


def worker_belongs_to_pool(worker_id: str, pool: str) -> bool:
    head, _, suffix = worker_id.rpartition("-")
    return head == pool and bool(WORKER_ID_SUFFIX.match(suffix))


def parse_pool_settings(model: type[SettingsModel], pool: PoolConfig) -> SettingsModel:
    """Validate a pool's provider-specific ``settings`` into ``model`` with a message naming the pool."""
    try:
        return model.model_validate(pool.settings)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors()
        )
        raise FleetConfigError(f"pool {pool.name!r} ({pool.provider}): invalid settings: {problems}") from exc
