"""Small text forms of values for people (the CLI and the dashboard)."""

from __future__ import annotations

from datetime import UTC, datetime


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """``"12s ago"``, ``"5m ago"``, ``"2.5h ago"``, ``"3.0d ago"``; ``"-"`` when unknown."""
    if moment is None:
        return "-"
    seconds = max(0.0, ((now or datetime.now(UTC)) - moment).total_seconds())
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.1f}d ago"


def size(count: int | None) -> str:
    """``"512 B"``, ``"64.0 KB"``, ``"1.2 GB"`` (powers of 1024); ``"-"`` when unknown."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
