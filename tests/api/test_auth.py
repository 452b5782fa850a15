"""API keys: Bearer authentication on /api/v1, per-tenant isolation, admin keys, open mode."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import httpx
import pytest
from api_helpers import API_KEYS, assert_error_shape, bearer, small_body

from comfyfleet.config import ApiKey, hash_api_key
from comfyfleet.http.auth import KeyRing
from comfyfleet.http.errors import Unauthorized

MakeClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
async def keyed(make_client: MakeClient) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(api_keys=API_KEYS) as client:
        yield client


async def submit_as(client: httpx.AsyncClient, tenant: str, **fields: object) -> str:
    response = await client.post("/api/v1/tasks", json=small_body(**fields), headers=bearer(tenant))
    assert response.status_code == 201, response.text
    assert response.json()["tenant"] == tenant
    task_id: str = response.json()["id"]
    return task_id


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, "unauthorized"),
        ({"Authorization": "Bearer wrong-key"}, "invalid_api_key"),
        ({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "unauthorized"),
        ({"Authorization": "Bearer"}, "unauthorized"),
        ({"Authorization": "alice-secret-key"}, "unauthorized"),
    ],
)
async def test_every_api_route_needs_a_valid_key(
    keyed: httpx.AsyncClient, headers: dict[str, str], error: str
) -> None:
    for method, path in (
        ("POST", "/api/v1/tasks"),
        ("GET", "/api/v1/tasks"),
        ("GET", "/api/v1/queue/metrics"),
        ("GET", "/api/v1/tasks/3f1b0c9e-0000-4000-8000-000000000000"),
        ("DELETE", "/api/v1/tasks/3f1b0c9e-0000-4000-8000-000000000000"),
    ):
        response = await keyed.request(
            method, path, json=small_body() if method == "POST" else None, headers=headers
        )
        assert_error_shape(response, 401, error)
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert (await keyed.get("/api/v1/tasks")).status_code == 401
    assert (await keyed.get("/api/v1/tasks", headers=bearer("alice"))).status_code == 200


@pytest.mark.parametrize(
    ("headers", "error"),
    [({}, "unauthorized"), ({"Authorization": "Bearer wrong-key"}, "invalid_api_key")],
)
async def test_the_gateway_refuses_a_missing_key_in_comfyuis_error_shape(
    keyed: httpx.AsyncClient, headers: dict[str, str], error: str
) -> None:
    """A ComfyUI client shows ``error.message`` of a refusal; the REST shape would leave it blank."""
    for method, path in (("POST", "/prompt"), ("GET", "/queue"), ("GET", "/history"), ("GET", "/api/queue")):
        response = await keyed.request(
            method, path, json={"prompt": {}} if method == "POST" else None, headers=headers
        )
        assert response.status_code == 401, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.headers["www-authenticate"].startswith("Bearer")
        body = response.json()
        assert set(body) == {"error", "node_errors"}
        assert body["node_errors"] == {}
        assert set(body["error"]) == {"type", "message", "details", "extra_info"}
        assert body["error"]["type"] == error
        assert "key" in body["error"]["message"]
        assert "token" in body["error"]["details"]
    assert (await keyed.get("/queue", headers=bearer("alice"))).status_code == 200
    assert (await keyed.get("/queue", params={"token": "alice-secret-key"})).status_code == 200


async def test_health_ready_and_docs_need_no_key(keyed: httpx.AsyncClient) -> None:
    for path in ("/health", "/ready", "/openapi.json", "/docs"):
        assert (await keyed.get(path)).status_code == 200, path


async def test_a_tenant_sees_and_cancels_only_its_own_tasks(keyed: httpx.AsyncClient) -> None:
    alice_task = await submit_as(keyed, "alice", workflow_id="shared-name")
    bob_task = await submit_as(keyed, "bob", workflow_id="shared-name")

    assert (await keyed.get(f"/api/v1/tasks/{alice_task}", headers=bearer("alice"))).status_code == 200
    # Another tenant's task does not exist as far as bob can tell: the same 404 as an unknown id.
    assert_error_shape(
        await keyed.get(f"/api/v1/tasks/{alice_task}", headers=bearer("bob")), 404, "not_found"
    )
    assert_error_shape(
        await keyed.delete(f"/api/v1/tasks/{alice_task}", headers=bearer("bob")), 404, "not_found"
    )
    assert (await keyed.get(f"/api/v1/tasks/{alice_task}", headers=bearer("alice"))).json()[
        "status"
    ] == "pending"

    listed = (
        await keyed.get("/api/v1/tasks", params={"workflow_id": "shared-name"}, headers=bearer("bob"))
    ).json()
    assert [task["id"] for task in listed["tasks"]] == [bob_task]
    metrics = (await keyed.get("/api/v1/queue/metrics", headers=bearer("bob"))).json()
    assert metrics["pending_tasks"] == 1

    cancelled = await keyed.delete(f"/api/v1/tasks/{bob_task}", headers=bearer("bob"))
    assert cancelled.status_code == 200


async def test_an_admin_key_sees_and_cancels_every_tenants_tasks(keyed: httpx.AsyncClient) -> None:
    alice_task = await submit_as(keyed, "alice")
    bob_task = await submit_as(keyed, "bob")
    listed = (await keyed.get("/api/v1/tasks", headers=bearer("ops"))).json()
    assert {task["id"] for task in listed["tasks"]} == {alice_task, bob_task}
    assert (await keyed.get("/api/v1/queue/metrics", headers=bearer("ops"))).json()["pending_tasks"] == 2
    assert (await keyed.get(f"/api/v1/tasks/{bob_task}", headers=bearer("ops"))).json()["tenant"] == "bob"
    assert (await keyed.delete(f"/api/v1/tasks/{alice_task}", headers=bearer("ops"))).status_code == 200


async def test_idempotency_keys_are_per_tenant(keyed: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "same-key"}
    alice = await keyed.post("/api/v1/tasks", json=small_body(), headers={**headers, **bearer("alice")})
    bob = await keyed.post("/api/v1/tasks", json=small_body(), headers={**headers, **bearer("bob")})
    assert alice.status_code == 201
    assert bob.status_code == 201
    assert alice.json()["id"] != bob.json()["id"]
    replay = await keyed.post("/api/v1/tasks", json=small_body(), headers={**headers, **bearer("alice")})
    assert replay.status_code == 200
    assert replay.json()["id"] == alice.json()["id"]


async def test_without_keys_everything_is_tenant_default(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/tasks", json=small_body(), headers={"Authorization": "Bearer anything"}
    )
    assert response.status_code == 201
    assert response.json()["tenant"] == "default"
    assert (await client.get("/api/v1/tasks")).json()["count"] == 1


def test_keys_are_matched_by_hash_only() -> None:
    ring = KeyRing(
        [ApiKey(key_hash=hash_api_key("k1"), tenant="t1"), ApiKey(key="k2", tenant="t2", admin=True)]
    )
    assert ring.principal_for("Bearer k1").tenant == "t1"
    assert not ring.principal_for("Bearer k1").admin
    assert ring.principal_for("bearer  k2").admin
    assert ring.principal_for("Bearer k1").visible_tenant == "t1"
    assert ring.principal_for("Bearer k2").visible_tenant is None
    with pytest.raises(Unauthorized):
        ring.principal_for("Bearer " + hash_api_key("k1"))  # the stored hash is not a key
    with pytest.raises(Unauthorized):
        ring.principal_for("Bearer k3")
    with pytest.raises(Unauthorized):
        ring.principal_for(None)


def test_plain_keys_are_not_kept_in_the_settings() -> None:
    key = ApiKey(key="plain-secret", tenant="t")
    assert key.key is None
    assert "plain-secret" not in repr(key)
    assert key.key_hash == hash_api_key("plain-secret")
