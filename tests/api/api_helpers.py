"""Helpers shared by the API tests (a uniquely named module: test folders are not packages)."""

from __future__ import annotations

from typing import Any

import httpx

from comfyfleet.config import ApiKey

SEED_TASK_FIELDS = (
    "id",
    "workflow_id",
    "priority",
    "status",
    "payload",
    "worker_id",
    "created_at",
    "started_at",
    "completed_at",
    "result",
    "error",
    "retry_count",
    "max_retries",
)

# Keys of the tenants used by the auth tests: alice and bob are tenants, ops is an admin.
KEYS = {"alice": "alice-secret-key", "bob": "bob-secret-key", "ops": "ops-admin-key"}
API_KEYS = [
    ApiKey(key=KEYS["alice"], tenant="alice"),
    ApiKey(key=KEYS["bob"], tenant="bob"),
    ApiKey(key=KEYS["ops"], tenant="ops", admin=True),
]


def small_body(**fields: Any) -> dict[str, Any]:
    return {"payload": {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64}}}, **fields}


def bearer(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def assert_error_shape(response: httpx.Response, status: int, error: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) <= {"error", "code", "message", "details"}, body
    assert body["code"] == status
    assert isinstance(body["error"], str)
    assert body["error"].islower()
    assert " " not in body["error"]
    assert isinstance(body["message"], str)
    assert body["message"]
    assert "Traceback" not in response.text
    if error is not None:
        assert body["error"] == error, body
    return body
