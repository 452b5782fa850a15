"""Bad input against a real server on loopback: each gets a 4xx in the error shape, and the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from api_helpers import API_KEYS, assert_error_shape, bearer, small_body

from comfyfleet.config import Limits
from support import FleetThread, seed_body

MAX_BODY_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    workdir = tmp_path_factory.mktemp("bad-input")
    limits = Limits(max_body_bytes=MAX_BODY_BYTES)
    with FleetThread(workdir, workers=0, api_keys=API_KEYS, limits=limits) as running:
        yield running


@pytest.fixture
async def http(server: FleetThread) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, headers=bearer("alice"), timeout=10) as client:
        yield client


async def still_serving(server: FleetThread) -> None:
    """A fresh connection can still submit and read a task."""
    async with httpx.AsyncClient(base_url=server.url, headers=bearer("alice"), timeout=10) as client:
        assert (await client.get("/health")).status_code == 200
        created = await client.post("/api/v1/tasks", json=seed_body())
        assert created.status_code == 201, created.text
        fetched = await client.get(f"/api/v1/tasks/{created.json()['id']}")
        assert fetched.status_code == 200


def post_raw(client: httpx.AsyncClient, content: bytes) -> httpx.Request:
    return client.build_request(
        "POST", "/api/v1/tasks", content=content, headers={"Content-Type": "application/json"}
    )


async def test_body_not_json(http: httpx.AsyncClient, server: FleetThread) -> None:
    for content in (b'{"payload": ', b"not json at all", b"\xff\xfe\x00", b""):
        response = await http.send(post_raw(http, content))
        body = assert_error_shape(response, 400 if content else 422)
        assert body["error"] in {"invalid_json", "validation_error"}
    await still_serving(server)


async def test_a_json_array(http: httpx.AsyncClient, server: FleetThread) -> None:
    response = await http.send(post_raw(http, json.dumps([seed_body()]).encode()))
    body = assert_error_shape(response, 422, "validation_error")
    assert body["message"] == "the request body must be a JSON object"
    await still_serving(server)


@pytest.mark.parametrize("payload", [[], "graph", 7, None, [["3", {"class_type": "KSampler"}]]])
async def test_payload_not_an_object(http: httpx.AsyncClient, server: FleetThread, payload: object) -> None:
    response = await http.post("/api/v1/tasks", json={"payload": payload})
    body = assert_error_shape(response, 422, "validation_error")
    assert body["details"]["errors"][0]["loc"] == ["body", "payload"]
    await still_serving(server)


async def test_missing_payload(http: httpx.AsyncClient, server: FleetThread) -> None:
    response = await http.post("/api/v1/tasks", json={"workflow_id": "x", "priority": 1})
    body = assert_error_shape(response, 422, "validation_error")
    assert body["details"]["errors"][0]["loc"] == ["body", "payload"]
    await still_serving(server)


async def test_a_node_without_class_type(http: httpx.AsyncClient, server: FleetThread) -> None:
    body = seed_body()
    del body["payload"]["6"]["class_type"]
    error = assert_error_shape(await http.post("/api/v1/tasks", json=body), 422, "invalid_graph")
    assert error["details"]["errors"] == [
        {
            "loc": ["body", "payload", "6"],
            "node_id": "6",
            "input_name": None,
            "type": "missing_class_type",
            "message": "node '6' has no class_type",
        }
    ]
    assert "'6'" in error["message"]
    await still_serving(server)


async def test_a_link_to_a_missing_node(http: httpx.AsyncClient, server: FleetThread) -> None:
    body = seed_body()
    body["payload"]["3"]["inputs"]["latent_image"] = ["55", 0]
    error = assert_error_shape(await http.post("/api/v1/tasks", json=body), 422, "invalid_graph")
    [problem] = error["details"]["errors"]
    assert (problem["node_id"], problem["input_name"], problem["type"]) == (
        "3",
        "latent_image",
        "link_to_missing_node",
    )
    assert "'latent_image'" in error["message"]
    assert "'55'" in error["message"]
    await still_serving(server)


async def test_a_cycle(http: httpx.AsyncClient, server: FleetThread) -> None:
    body = seed_body()
    body["payload"]["4"]["inputs"]["ckpt_name"] = ["9", 0]  # the loader now reads the saver's output
    error = assert_error_shape(await http.post("/api/v1/tasks", json=body), 422, "invalid_graph")
    [problem] = error["details"]["errors"]
    assert problem["type"] == "cycle"
    assert problem["node_id"] is not None
    assert problem["input_name"] is not None
    assert "cycle" in error["message"]
    await still_serving(server)


@pytest.mark.parametrize("priority", [5.5, 5.0, "5", "high", None, [5], True])
async def test_a_non_integer_priority(http: httpx.AsyncClient, server: FleetThread, priority: object) -> None:
    body = seed_body()
    body["priority"] = priority
    error = assert_error_shape(await http.post("/api/v1/tasks", json=body), 422, "validation_error")
    assert error["details"]["errors"][0]["loc"] == ["body", "priority"]
    await still_serving(server)


@pytest.mark.parametrize("field", ["payload", "metadata"])
async def test_values_nested_absurdly_deep(http: httpx.AsyncClient, server: FleetThread, field: str) -> None:
    # Deep enough to be stored but not serialized back: refused up front, never a 500 after the insert.
    deep = "[" * 500 + "]" * 500
    if field == "payload":
        content = '{"payload": {"1": {"class_type": "X", "inputs": {"a": DEEP}}}}'.replace("DEEP", deep)
    else:
        content = '{"payload": {"1": {"class_type": "X", "inputs": {}}}, "metadata": {"a": DEEP}}'.replace(
            "DEEP", deep
        )
    before = (await http.get("/api/v1/tasks", params={"limit": 500})).json()["count"]
    error = assert_error_shape(await http.send(post_raw(http, content.encode())), 422)
    assert "nested deeper than 64 levels" in error["message"]
    assert (await http.get("/api/v1/tasks", params={"limit": 500})).json()["count"] == before
    await still_serving(server)


async def test_a_body_over_the_limit(http: httpx.AsyncClient, server: FleetThread) -> None:
    body = small_body(metadata={"padding": "x" * MAX_BODY_BYTES})
    content = json.dumps(body).encode()
    response = await http.send(post_raw(http, content))
    error = assert_error_shape(response, 413, "request_too_large")
    assert error["details"] == {"max_body_bytes": MAX_BODY_BYTES}
    # The same keep-alive connection goes on with the next request (the refused body was skipped whole).
    assert (await http.post("/api/v1/tasks", json=small_body())).status_code == 201
    await still_serving(server)


async def test_a_chunked_body_over_the_limit(http: httpx.AsyncClient, server: FleetThread) -> None:
    # No Content-Length: the size is only known by reading, so the server must count as it reads.
    chunk = b" " * 8192

    async def stream() -> AsyncIterator[bytes]:
        yield b'{"payload": {"1": {"class_type": "X", "inputs": {}}}, "metadata": {"p": "'
        for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
            yield chunk
        yield b'"}}'

    request = http.build_request(
        "POST", "/api/v1/tasks", content=stream(), headers={"Content-Type": "application/json"}
    )
    assert "content-length" not in request.headers
    assert_error_shape(await http.send(request), 413, "request_too_large")
    assert (await http.post("/api/v1/tasks", json=small_body())).status_code == 201
    await still_serving(server)


async def test_a_chunked_body_under_the_limit_is_accepted(http: httpx.AsyncClient) -> None:
    async def stream() -> AsyncIterator[bytes]:
        text = json.dumps(seed_body()).encode()
        for start in range(0, len(text), 100):
            yield text[start : start + 100]

    request = http.build_request(
        "POST", "/api/v1/tasks", content=stream(), headers={"Content-Type": "application/json"}
    )
    response = await http.send(request)
    assert response.status_code == 201, response.text
    assert response.json()["payload"] == seed_body()["payload"]


async def test_an_unknown_task_id(http: httpx.AsyncClient, server: FleetThread) -> None:
    for task_id in ("3f1b0c9e-0000-4000-8000-000000000000", "nope"):
        body = assert_error_shape(await http.get(f"/api/v1/tasks/{task_id}"), 404, "not_found")
        assert task_id in body["message"]
        assert_error_shape(await http.delete(f"/api/v1/tasks/{task_id}"), 404, "not_found")
    await still_serving(server)


async def test_a_wrong_api_key(server: FleetThread) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as anonymous:
        for headers in ({"Authorization": "Bearer not-a-key"}, {}):
            response = await anonymous.post("/api/v1/tasks", json=seed_body(), headers=headers)
            assert_error_shape(response, 401)
    await still_serving(server)


async def test_another_tenants_task(http: httpx.AsyncClient, server: FleetThread) -> None:
    created = await http.post("/api/v1/tasks", json=seed_body())
    task_id = created.json()["id"]
    body = assert_error_shape(
        await http.get(f"/api/v1/tasks/{task_id}", headers=bearer("bob")), 404, "not_found"
    )
    assert "alice" not in body["message"]
    assert_error_shape(await http.delete(f"/api/v1/tasks/{task_id}", headers=bearer("bob")), 404, "not_found")
    assert (await http.get(f"/api/v1/tasks/{task_id}")).json()["status"] == "pending"
    await still_serving(server)


async def test_wrong_content_type(http: httpx.AsyncClient, server: FleetThread) -> None:
    response = await http.post(
        "/api/v1/tasks",
        content=json.dumps(seed_body()).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    error = assert_error_shape(response, 415, "unsupported_media_type")
    assert "application/json" in error["message"]
    await still_serving(server)


async def test_unknown_route_and_method(http: httpx.AsyncClient, server: FleetThread) -> None:
    assert_error_shape(await http.get("/api/v9/tasks"), 404, "not_found")
    assert_error_shape(
        await http.put("/api/v1/tasks/3f1b0c9e-0000-4000-8000-000000000000"), 405, "method_not_allowed"
    )
    await still_serving(server)
