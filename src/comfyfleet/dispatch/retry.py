"""Which failures are retried, and when. Pure functions."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

_OOM_MARKERS = ("OutOfMemoryError", "out of memory", "Allocation on device")


def classify_execution_error(error: dict[str, Any]) -> str:
    """ComfyUI ``execution_error`` data → failure kind. OOM is retryable (elsewhere); a node that raised on
    the user's input is not."""
    text = f"{error.get('exception_type', '')} {error.get('exception_message', '')}"
    if any(marker in text for marker in _OOM_MARKERS):
        return "out_of_memory"
    return "node_error"


def backoff_s(retry_count: int, *, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Exponential back-off with full jitter: uniform in [base·2ⁿ/2, base·2ⁿ], capped at ``max_s``."""
    ceiling = min(max_s, base_s * (2 ** max(retry_count, 0)))
    draw = (rng or random).random()
    return float(ceiling / 2 + draw * ceiling / 2)


def next_attempt_at(now: datetime, retry_count: int, *, base_s: float, max_s: float) -> datetime:
    return now + timedelta(seconds=backoff_s(retry_count, base_s=base_s, max_s=max_s))


def sanitize_execution_error(error: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A message for users and the details worth keeping, without server tracebacks or tensors."""
    node = error.get("node_type") or "node"
    node_id = error.get("node_id")
    message = str(error.get("exception_message") or "execution error").strip()
    summary = f"{node} (node {node_id}): {message}" if node_id else f"{node}: {message}"
    details: dict[str, Any] = {
        key: error[key]
        for key in ("node_id", "node_type", "exception_type", "exception_message", "executed")
        if key in error
    }
    if "exception_message" in details:
        details["exception_message"] = message  # ComfyUI ends it with a newline (and sometimes tips)
    return summary, details
