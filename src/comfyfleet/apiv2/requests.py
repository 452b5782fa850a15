"""What a v2 request carries, read and checked: a job submission's body, an ``Idempotency-Key``, a job list's
query. Each problem is a :class:`~comfyfleet.apiv2.errors.V2Error` with v2's code."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from comfyfleet.apiv2.errors import V2Error, invalid_request
from comfyfleet.apiv2.wire import TASK_STATUSES

# Reserved by v2 for later and refused when present (the spec's own words).
RESERVED_FIELDS = ("webhook_url", "inputs")
MAX_LABELS = 16
MAX_LABEL_VALUE_BYTES = 256
MAX_LABEL_FILTERS = 3
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 100
MAX_KEY_LENGTH = 255
_LABEL_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,40}$")
# Control characters (tab and newline included), C1 controls, bidirectional embeddings/overrides/isolates.
_LABEL_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_FILTER = re.compile(r"^metadata\[(.*)\]$")


@dataclass(frozen=True, slots=True)
class JobRequest:
    workflow: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    pool: str | None = None


async def read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise invalid_request(f"the request body is not valid JSON: {exc}", status=400) from None


def looks_like_ui_format(workflow: Mapping[str, Any]) -> bool:
    """The editor's export (``nodes``/``links`` lists), not the API format (node id → node)."""
    return isinstance(workflow.get("nodes"), list) and isinstance(workflow.get("links"), list)


def job_request(body: Any) -> JobRequest:
    """The submission in ``body`` (``POST /api/v2/jobs``)."""
    if not isinstance(body, dict):
        raise invalid_request("the request body must be a JSON object with 'workflow'")
    for name in RESERVED_FIELDS:
        if body.get(name) is not None:
            raise invalid_request(f"{name!r} is reserved by Comfy API v2 for later and not accepted yet")
    workflow = body.get("workflow")
    if not isinstance(workflow, dict):
        raise invalid_request("'workflow' (the API-format graph, an object) is required")
    if looks_like_ui_format(workflow):
        raise V2Error(
            422,
            "workflow_format_ui",
            "this is the editor's export (nodes/links); export the workflow in API format (Export (API))",
        )
    check_extra_data(body.get("extra_data"))
    priority = body.get("priority", 0)
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise invalid_request("'priority' must be an integer (higher runs first)")
    pool = body.get("pool")
    if pool is not None and not isinstance(pool, str):
        raise invalid_request("'pool' must be the name of a pool")
    return JobRequest(workflow, labels(body.get("metadata")), priority, pool)


def check_extra_data(extra_data: Any) -> None:
    if extra_data is None:
        return
    if not isinstance(extra_data, dict) or set(extra_data) - {"api_key_comfy_org"}:
        raise invalid_request("'extra_data' accepts only 'api_key_comfy_org'")
    key = extra_data.get("api_key_comfy_org")
    if key is None:
        return
    if not isinstance(key, str):
        raise invalid_request("'extra_data.api_key_comfy_org' must be a string")
    # comfyfleet stores a job durably and may run it later, on another replica: forwarding the key would mean
    # storing it, which v2 forbids. Refused plainly rather than dropped, so partner nodes do not fail later.
    raise V2Error(
        422,
        "extra_data_not_supported",
        "comfyfleet does not forward 'extra_data.api_key_comfy_org' (it would have to store the key with the "
        "job); partner (API) nodes are not supported on this server yet",
    )


def labels(metadata: Any) -> dict[str, str]:
    """A job's string labels (``metadata``), checked as Comfy API v2 deployments check them."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise V2Error(422, "metadata_invalid", "'metadata' must be an object of string labels")
    if len(metadata) > MAX_LABELS:
        raise V2Error(422, "metadata_invalid", f"'metadata' has {len(metadata)} labels; at most {MAX_LABELS}")
    for key, value in metadata.items():
        problem = label_problem(key, value)
        if problem:
            raise V2Error(422, "metadata_invalid", f"metadata label {key[:40]!r}: {problem}")
    return dict(metadata)


def label_problem(key: str, value: Any) -> str | None:
    if not _LABEL_KEY.match(key):
        return "a key is 1 to 40 characters from A-Z a-z 0-9 _ - ."
    if not isinstance(value, str):
        return "the value must be a string"
    if len(value.encode("utf-8")) > MAX_LABEL_VALUE_BYTES:
        return f"the value is longer than {MAX_LABEL_VALUE_BYTES} bytes (UTF-8)"
    if _LABEL_FORBIDDEN.search(value):
        return "the value holds a control or bidirectional formatting character"
    return None


def idempotency_key(header: str | None) -> str | None:
    if header is None:
        return None
    if not 0 < len(header) <= MAX_KEY_LENGTH or not header.isascii() or not header.isprintable():
        raise invalid_request(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters")
    return header


@dataclass(frozen=True, slots=True)
class ListQuery:
    limit: int
    cursor: str | None
    statuses: frozenset[str] | None
    labels: dict[str, str]


def list_query(query: Mapping[str, str]) -> ListQuery:
    """``GET /api/v2/jobs``'s query: ``limit`` (1 to 100, 50 by default), ``cursor`` (the ``next_cursor`` of
    the page before), ``status`` (comma-separated v2 statuses), ``metadata[<key>]=<value>`` (at most 3)."""
    raw_limit = query.get("limit")
    limit = DEFAULT_LIST_LIMIT
    if raw_limit is not None:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIST_LIMIT:
            raise invalid_request(f"'limit' must be an integer from 1 to {MAX_LIST_LIMIT}", status=400)
        limit = int(raw_limit)
    statuses = None
    if query.get("status"):
        statuses = frozenset(part.strip() for part in query["status"].split(",") if part.strip())
        unknown = sorted(statuses - set(TASK_STATUSES))
        if unknown:
            raise invalid_request(f"unknown status filter(s): {', '.join(unknown)}", status=400)
    filters = {}
    for name, value in query.items():
        match = _FILTER.match(name)
        if match is None:
            continue
        problem = label_problem(match[1], value)
        if problem:
            raise V2Error(400, "invalid_metadata_filter", f"metadata filter {match[1][:40]!r}: {problem}")
        filters[match[1]] = value
    if len(filters) > MAX_LABEL_FILTERS:
        raise V2Error(400, "invalid_metadata_filter", f"at most {MAX_LABEL_FILTERS} metadata filters")
    return ListQuery(limit, query.get("cursor") or None, statuses, filters)
