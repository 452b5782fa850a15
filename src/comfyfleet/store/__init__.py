"""The durable state: tasks, workers, webhook deliveries and wake-ups. Backends are chosen by URL scheme;
the ports by role are in ``base.py``."""

from __future__ import annotations

import importlib
from typing import Any

from comfyfleet.store._common import cursor_after
from comfyfleet.store.base import (
    AssetRecords,
    Conflict,
    Coordination,
    DispatchQueue,
    IdempotencyKeys,
    InvalidArgument,
    Lease,
    NotFound,
    Notification,
    StaleLease,
    Store,
    StoreClosed,
    StoreError,
    StoreUnavailable,
    TaskPage,
    TaskQueue,
    WebhookDelivery,
    WebhookOutbox,
    WorkerRecords,
)

# scheme -> "module:Class", imported only when chosen so asyncpg loads only for PostgreSQL.
BACKENDS: dict[str, str] = {
    "sqlite": "comfyfleet.store.sqlite:SQLiteStore",
    "postgresql": "comfyfleet.store.postgres:PostgresStore",
    "postgres": "comfyfleet.store.postgres:PostgresStore",
}


class UnknownStoreURL(StoreError):
    """The store URL names a scheme that no backend serves."""


def open_store(url: str, **options: Any) -> Store:
    """Build (not yet open) the store for ``url``: ``sqlite:///path.db`` or ``postgresql://…``."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    target = BACKENDS.get(scheme)
    if target is None:
        valid = ", ".join(f"{name}://" for name in sorted(BACKENDS))
        raise UnknownStoreURL(f"unknown store URL {url!r}: use one of {valid}")
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownStoreURL(
            f"the {scheme} store needs an extra: pip install 'comfyfleet[postgres]' ({exc})"
        ) from exc
    store: Store = getattr(module, class_name)(url, **options)
    return store


__all__ = [
    "BACKENDS",
    "AssetRecords",
    "Conflict",
    "Coordination",
    "DispatchQueue",
    "IdempotencyKeys",
    "InvalidArgument",
    "Lease",
    "NotFound",
    "Notification",
    "StaleLease",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoreUnavailable",
    "TaskPage",
    "TaskQueue",
    "UnknownStoreURL",
    "WebhookDelivery",
    "WebhookOutbox",
    "WorkerRecords",
    "cursor_after",
    "open_store",
]
