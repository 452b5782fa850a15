"""Pools as the fleet sees them: the configured pools by name, worker ids, and each pool's scaling memory."""

from __future__ import annotations

import dataclasses
import re
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from comfyfleet.fleet.errors import FleetConfigError

if TYPE_CHECKING:
    from comfyfleet.config import PoolConfig, Settings

POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*(?:-[A-Za-z0-9_.]+)*$")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_worker_id(pool: str) -> str:
    """``<pool>-<10 hex>``: providers put it in labels / names, so an instance can be tied back to its record."""
    return f"{pool}-{secrets.token_hex(5)}"


def pools_from_settings(settings: Settings) -> dict[str, PoolConfig]:
    """The configured pools by name; ``workers: [urls]`` becomes the static pool ``default``."""
    from comfyfleet.config import PoolConfig

    pools: dict[str, PoolConfig] = {}
    if settings.workers:
        if any(pool.name == "default" for pool in settings.pools):
            raise FleetConfigError(
                "`workers` makes a static pool named 'default'; a pool of that name is also configured"
            )
        pools["default"] = PoolConfig(
            name="default",
            provider="static",
            min_workers=len(settings.workers),
            max_workers=len(settings.workers),
            settings={"urls": list(settings.workers)},
        )
    for pool in settings.pools:
        if not POOL_NAME.match(pool.name) or len(pool.name) > 40:
            raise FleetConfigError(
                f"pool name {pool.name!r}: use letters, digits, '_', '.' and single '-' between them (at most 40)"
            )
        pools[pool.name] = pool
    return pools


@dataclasses.dataclass(slots=True)
class PoolTracker:
    """The reconciler's memory of one pool (leader-local; a new leader starts fresh, which is safe)."""

    last_scale_up_at: datetime | None = None
    last_scale_down_at: datetime | None = None
    failed_starts: int = 0
    last_failed_start_at: datetime | None = None

    def start_failed(self) -> None:
        """A create error, a failure before ready or the start-up timeout: the next start backs off."""
        self.failed_starts += 1
        self.last_failed_start_at = utcnow()

    def worker_ready(self) -> None:
        self.failed_starts = 0
