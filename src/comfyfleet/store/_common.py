"""Small pieces every backend shares: migrations on disk, paging cursors, limits, leader keys, JSON text, and the
decisions that turn "no row changed" into the right error."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from pydantic_core import PydanticSerializationError, to_json

from comfyfleet.domain import Task
from comfyfleet.store.base import Conflict, InvalidArgument, Lease, NotFound, StaleLease

MAX_LIST_LIMIT = 1000

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def json_text(value: Any) -> str:
    """A JSON value as compact JSON text: what ``json.dumps(value, separators=(",", ":"))`` writes, read back
    to the same value (non-ASCII characters are written as themselves, not escaped; NaN and Infinity as
    Python's JSON writes them), rendered by pydantic-core several times quicker (a submission's payload is
    written on every submission).
    """
    try:
        return to_json(value, inf_nan_mode="constants").decode()
    except PydanticSerializationError:  # a lone surrogate has no UTF-8 form; json.dumps escapes it
        return json.dumps(value, separators=(",", ":"))


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


@functools.cache
def load_migrations(dialect: str) -> tuple[Migration, ...]:
    """The numbered ``migrations/<dialect>/NNNN_name.sql`` files, in order."""
    folder = resources.files("comfyfleet.store") / "migrations" / dialect
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration numbers for {dialect}: {versions}")
    return tuple(found)


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = text.partition(":")
        if prefix != "seq" or not value.isdigit():
            raise ValueError(text)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            f"invalid cursor {cursor[:80]!r}: pass the next_cursor of a previous page"
        ) from exc


def check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidArgument(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}")


def pool_filter(pools: Collection[str | None] | None) -> dict[str, Any] | None:
    """The parameters of the dialects' pool filter (``any_pool``, ``pools``, ``null_pool``): every pool when
    ``pools`` is None, else the named ones, plus tasks with no pool when ``None`` is among them. ``None`` when
    no task can match (an empty collection), so the caller need not ask the database."""
    if pools is None:
        return {"any_pool": True, "pools": [], "null_pool": False}
    named = sorted({pool for pool in pools if pool is not None})
    if not named and None not in pools:
        return None
    return {"any_pool": False, "pools": named, "null_pool": None in pools}


def not_pending(task_id: str, status: str | None) -> NotFound | Conflict:
    """Why a change that needs a pending task did not apply: unknown (or another tenant's), or it moved on."""
    if status is None:
        return NotFound(f"task {task_id} not found")
    return Conflict(f"task {task_id} is already {status}: only a pending task can be changed")


def not_cancellable(task_id: str, status: str | None) -> NotFound | Conflict:
    """Why a cancel did not apply: unknown (or another tenant's), or already finished."""
    if status is None:
        return NotFound(f"task {task_id} not found")
    return Conflict(f"task {task_id} is already {status}")


def fence_failure(lease: Lease, current: Sequence[Any] | None) -> NotFound | StaleLease:
    """Why a write fenced by ``lease`` changed nothing, from the task's ``(status, attempt, owner)`` now:
    the task is unknown, or another attempt or owner holds it (or it is no longer running)."""
    if current is None:
        return NotFound(f"task {lease.task_id} not found")
    status, attempt, owner = current
    return StaleLease(
        f"task {lease.task_id}: lease attempt={lease.attempt} owner={lease.owner} is stale "
        f"(task is {status}, attempt={attempt}, owner={owner})"
    )


def advisory_key(namespace: str, name: str) -> int:
    """A stable signed 64-bit advisory-lock key (the same in every replica); namespaces keep leadership
    names apart from the store's own locks."""
    digest = hashlib.sha256(f"comfyfleet:{namespace}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def cursor_after(task: Task) -> str:
    """The ``cursor`` of a list page that goes on after ``task`` (newest first), for a caller that ends a
    page before the store's ``limit`` (e.g. at a byte budget)."""
    return encode_cursor(task.seq)
