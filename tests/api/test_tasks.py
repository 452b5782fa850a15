"""The task routes over a real SQLite store: submit, read, list, cancel, metrics, health."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import SEED_TASK_FIELDS, assert_error_shape, small_body
from pydantic_core import from_json

from comfyfleet.config import Limits, PoolConfig
from comfyfleet.store import Lease, Store
from support import seed_body

MakeClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


def parse_time(value: str) -> datetime:
    assert value.endswith("Z"), f"not an RFC 3339 UTC time: {value}"
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() is not None
    assert not parsed.utcoffset()
    return parsed


async def submit(
    client: httpx.AsyncClient, body: dict[str, Any] | None = None, **headers: str
) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/tasks", json=body if body is not None else small_body(), headers=headers
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def test_seed_curl_example_gets_201_and_every_seed_field(client: httpx.AsyncClient) -> None:
    # Phase 1.1 of the seed: the same body and Content-Type the curl example sends.
    response = await client.post(
        "/api/v1/tasks",
        content=httpx.Request("POST", "/", json=seed_body()).content,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["workflow_id"] == "text_to_image_v1"
    assert created["status"] == "pending"
    assert created["priority"] == 5
    assert isinstance(created["id"], str)
    assert len(created["id"]) == 36
    before = datetime.now(UTC)
    assert abs((parse_time(created["created_at"]) - before).total_seconds()) < 60
    assert response.headers["location"] == f"/api/v1/tasks/{created['id']}"

    fetched = await client.get(f"/api/v1/tasks/{created['id']}")
    assert fetched.status_code == 200
    task = fetched.json()
    for field in SEED_TASK_FIELDS:
        assert field in task, field
    assert task["payload"] == seed_body()["payload"]
    assert task["worker_id"] is None
    assert task["started_at"] is None
    assert task["completed_at"] is None
    assert task["result"] is None
    assert task["error"] is None
    assert task["retry_count"] == 0
    assert task["max_retries"] == 3
    assert task["queue_position"] == 1
    assert {key: value for key, value in task.items() if key != "queue_position"} == {
        key: value for key, value in created.items() if key != "queue_position"
    }


async def test_task_json_has_the_lifecycle_fields(client: httpx.AsyncClient) -> None:
    created = await submit(
        client,
        small_body(
            timeout_s=90,
            max_retries=1,
            pool=None,
            metadata={"user": "u1"},
            webhook={"url": "https://example.test/hook", "secret": "shh"},
            inputs=[{"name": "a.png", "url": "https://example.test/a.png"}],
        ),
    )
    for field in (
        "phase",
        "attempt",
        "prompt_id",
        "timeout_s",
        "not_before",
        "tenant",
        "updated_at",
        "pool",
        "progress",
        "attempts",
        "error_details",
        "queue_position",
    ):
        assert field in created, field
    assert created["timeout_s"] == 90
    assert created["max_retries"] == 1
    assert created["tenant"] == "default"
    assert created["attempt"] == 0
    assert created["attempts"] == []
    assert created["metadata"] == {"user": "u1"}
    assert created["inputs"] == [{"name": "a.png", "url": "https://example.test/a.png"}]
    assert created["webhook"] == {"url": "https://example.test/hook", "secret": "********"}
    parse_time(created["updated_at"])


async def test_defaults_come_from_the_settings(make_client: MakeClient) -> None:
    async with make_client(dispatch={"default_timeout_s": 42.0, "default_max_retries": 7}) as client:
        created = await submit(client)
    assert created["timeout_s"] == 42.0
    assert created["max_retries"] == 7
    assert created["priority"] == 0


async def test_webhook_url_shorthand(client: httpx.AsyncClient) -> None:
    created = await submit(client, small_body(webhook="https://example.test/hook"))
    assert created["webhook"] == {"url": "https://example.test/hook"}


async def test_priority_bounds_come_from_the_settings(make_client: MakeClient) -> None:
    async with make_client(limits=Limits(min_priority=-10, max_priority=10)) as client:
        assert (await submit(client, small_body(priority=10)))["priority"] == 10
        assert (await submit(client, small_body(priority=-10)))["priority"] == -10
        for priority in (11, -11):
            response = await client.post("/api/v1/tasks", json=small_body(priority=priority))
            body = assert_error_shape(response, 422, "validation_error")
            assert "-10" in body["message"]
            assert "10" in body["message"]
            assert body["details"]["errors"][0]["loc"] == ["body", "priority"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("priority", "5"),
        ("priority", 5.0),
        ("priority", True),
        ("max_retries", -1),
        ("max_retries", 1.5),
        ("timeout_s", 0),
        ("timeout_s", "30"),
        ("workflow_id", 12),
        ("metadata", [1]),
        ("inputs", {"a": 1}),
        ("colour", "blue"),
    ],
)
async def test_invalid_fields_are_422_in_the_error_shape(
    client: httpx.AsyncClient, field: str, value: Any
) -> None:
    response = await client.post("/api/v1/tasks", json=small_body(**{field: value}))
    body = assert_error_shape(response, 422, "validation_error")
    assert body["details"]["errors"][0]["loc"] == ["body", field]
    assert field in body["message"]


async def test_unknown_pool_is_refused_when_pools_are_configured(make_client: MakeClient) -> None:
    async with make_client(
        pools=[PoolConfig(name="gpu", labels=["sdxl"])], workers=["http://127.0.0.1:1"]
    ) as client:
        assert (await submit(client, small_body(pool="gpu")))["pool"] == "gpu"
        assert (await submit(client, small_body(pool="sdxl")))["pool"] == "sdxl"  # a label of a pool
        assert (await submit(client, small_body(pool="default")))["pool"] == "default"
        body = assert_error_shape(
            await client.post("/api/v1/tasks", json=small_body(pool="gpus")), 422, "unknown_pool"
        )
        assert "'gpus'" in body["message"]
        assert "gpu" in body["message"]


async def test_every_graph_problem_is_listed_with_node_and_input(client: httpx.AsyncClient) -> None:
    body = seed_body()
    del body["payload"]["4"]  # three inputs now link to a missing node
    body["payload"]["9"]["inputs"]["images"] = ["8", -1]
    response = await client.post("/api/v1/tasks", json=body)
    error = assert_error_shape(response, 422, "invalid_graph")
    problems = {
        (entry["node_id"], entry["input_name"], entry["type"]) for entry in error["details"]["errors"]
    }
    assert problems == {
        ("3", "model", "link_to_missing_node"),
        ("6", "clip", "link_to_missing_node"),
        ("7", "clip", "link_to_missing_node"),
        ("8", "vae", "link_to_missing_node"),
        ("9", "images", "invalid_link"),
    }
    assert "(and 4 more problems)" in error["message"]
    assert all(entry["loc"][:2] == ["body", "payload"] for entry in error["details"]["errors"])


async def test_node_limit(make_client: MakeClient) -> None:
    async with make_client(limits=Limits(max_nodes=5)) as client:
        response = await client.post("/api/v1/tasks", json=seed_body())
        body = assert_error_shape(response, 422, "invalid_graph")
        assert body["details"]["errors"][0]["type"] == "too_many_nodes"


async def test_idempotency_key_returns_the_original(client: httpx.AsyncClient, api_store: Store) -> None:
    first = await client.post(
        "/api/v1/tasks", json=small_body(priority=1), headers={"Idempotency-Key": "order-17"}
    )
    assert first.status_code == 201
    again = await client.post(
        "/api/v1/tasks", json=small_body(priority=1), headers={"Idempotency-Key": "order-17"}
    )
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    # The same key with another request is a mistake said out loud, not a silent answer about another task.
    changed = await client.post(
        "/api/v1/tasks", json=small_body(priority=9), headers={"Idempotency-Key": "order-17"}
    )
    body = assert_error_shape(changed, 422, "idempotency_key_reused")
    assert body["details"]["task_id"] == first.json()["id"]
    other = await client.post("/api/v1/tasks", json=small_body(), headers={"Idempotency-Key": "order-18"})
    assert other.status_code == 201
    assert other.json()["id"] != first.json()["id"]
    assert (await api_store.queue_metrics()).pending_tasks == 2
    too_long = await client.post("/api/v1/tasks", json=small_body(), headers={"Idempotency-Key": "k" * 256})
    assert_error_shape(too_long, 422, "validation_error")


async def test_plain_submissions_are_answered_as_fastapi_answers_them(client: httpx.AsyncClient) -> None:
    """The submission route answers plain requests itself (with no query, or a plain ``?wait=<seconds>``) and
    hands the rest (here: a ``wait`` in another notation) to FastAPI's handler; both answer alike: status, headers
    in order, body."""

    async def both(key: str, **body: Any) -> tuple[httpx.Response, httpx.Response]:
        plain = await client.post("/api/v1/tasks", json=small_body(**body), headers={"Idempotency-Key": key})
        handed = await client.post(
            "/api/v1/tasks",
            params={"wait": "0e0"},
            json=small_body(**body),
            headers={"Idempotency-Key": key + "-b"},
        )
        return plain, handed

    def shape(response: httpx.Response) -> tuple[int, list[str], list[str]]:
        names = [name for name, _ in response.headers.multi_items()]
        return response.status_code, names, sorted(response.json())

    for created in await both("plain", priority=3, metadata={"note": "é"}):
        assert created.status_code == 201
    plain, handed = await both("plain", priority=3, metadata={"note": "é"})  # both replayed now
    assert shape(plain) == shape(handed)
    assert plain.headers["idempotent-replayed"] == handed.headers["idempotent-replayed"] == "true"
    assert plain.headers["location"] == f"/api/v1/tasks/{plain.json()['id']}"
    new_plain = await client.post("/api/v1/tasks", json=small_body(priority=2))
    plain_wait = await client.post("/api/v1/tasks", params={"wait": "0.5"}, json=small_body(priority=2))
    new_handed = await client.post("/api/v1/tasks", params={"wait": "0e0"}, json=small_body(priority=2))
    ignore = {"id", "created_at", "updated_at"}
    for answer in (new_plain, plain_wait):
        assert shape(answer) == shape(new_handed)
        assert {k: v for k, v in answer.json().items() if k not in ignore} == {
            k: v for k, v in new_handed.json().items() if k not in ignore
        }
    too_long = await client.post("/api/v1/tasks", params={"wait": "601"}, json=small_body())
    assert_error_shape(too_long, 422, "validation_error")  # out of bounds: FastAPI words the refusal


async def test_a_submission_whose_body_comes_in_pieces(client: httpx.AsyncClient) -> None:
    body = json.dumps(small_body(priority=4, metadata={"note": "x" * 5000})).encode()
    pieces = [body[:10], body[10:3000], body[3000:]]

    async def stream() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    response = await client.post(
        "/api/v1/tasks",
        content=stream(),
        headers={"Content-Type": "application/json", "Content-Length": str(len(body))},
    )
    assert response.status_code == 201, response.text
    stored = (await client.get(response.headers["location"])).json()
    assert stored["metadata"] == {"note": "x" * 5000}
    assert stored["priority"] == 4


# Documents whose reading differs most between JSON readers.
_TRICKY_JSON = [
    '{"a":1,"b":2,"a":3}',
    '"\\ud800"',
    '"\\ud83d\\ude00"',
    "1e400",
    "-0",
    "-0.0",
    "1E2",
    "5e-324",
    "123456789012345678901234567890",
    "9007199254740993.0",
    "0.30000000000000004",
    "NaN",
    "-Infinity",
    '"a\tb"',
    '"\\u0000"',
    "{} x",
    "[1,]",
    "01",
    "\ufeff{}",
    '"\u00e9"',
]


@pytest.mark.parametrize("text", _TRICKY_JSON)
def test_the_submission_route_reads_json_as_fastapi_does(text: str) -> None:
    """The plain path reads bodies with pydantic-core; whatever that reader accepts must read as FastAPI's
    json.loads reads it (what it refuses goes to FastAPI's handler)."""
    body = text.encode("utf-8", "surrogatepass")
    try:
        read = from_json(body)
    except ValueError:
        return
    expected = json.loads(body)
    assert repr(read) == repr(expected)
    assert json.dumps(read) == json.dumps(expected)


async def test_queue_position_is_priority_then_fifo(client: httpx.AsyncClient) -> None:
    low = await submit(client, small_body(priority=1))
    high_first = await submit(client, small_body(priority=5))
    high_second = await submit(client, small_body(priority=5))
    positions = {}
    for task in (low, high_first, high_second):
        positions[task["id"]] = (await client.get(f"/api/v1/tasks/{task['id']}")).json()["queue_position"]
    assert positions == {high_first["id"]: 1, high_second["id"]: 2, low["id"]: 3}


async def test_list_filters_and_pages_newest_first(client: httpx.AsyncClient, api_store: Store) -> None:
    empty = await client.get("/api/v1/tasks")
    assert empty.status_code == 200
    assert empty.json() == {"tasks": [], "count": 0, "next_cursor": None}

    ids = [
        (await submit(client, small_body(workflow_id="a" if index % 2 else "b")))["id"] for index in range(7)
    ]
    claimed = await api_store.claim_ids(
        "test-dispatcher", 30.0, [head.id for head in await api_store.peek_pending(limit=1)]
    )
    assert [task.id for task in claimed] == [ids[0]]

    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/v1/tasks", params=params)).json()
        assert page["count"] == len(page["tasks"]) <= 3
        seen += [task["id"] for task in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))

    only_b = (await client.get("/api/v1/tasks", params={"workflow_id": "b"})).json()
    assert [task["id"] for task in only_b["tasks"]] == [ids[6], ids[4], ids[2], ids[0]]
    running = (await client.get("/api/v1/tasks", params={"status": "running"})).json()
    assert [task["id"] for task in running["tasks"]] == [ids[0]]
    assert running["tasks"][0]["phase"] == "dispatching"
    assert running["tasks"][0]["attempt"] == 1
    both = (await client.get("/api/v1/tasks", params={"status": "running, pending", "limit": 500})).json()
    assert both["count"] == 7
    both_b = (await client.get("/api/v1/tasks", params={"status": "pending", "workflow_id": "b"})).json()
    assert [task["id"] for task in both_b["tasks"]] == [ids[6], ids[4], ids[2]]


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 501}, {"limit": "ten"}, {"status": "pending,done"}, {"cursor": "not-a-cursor"}],
)
async def test_bad_list_parameters(client: httpx.AsyncClient, params: dict[str, Any]) -> None:
    response = await client.get("/api/v1/tasks", params=params)
    body = assert_error_shape(response, 422)
    assert body["error"] in {"validation_error", "invalid_argument"}


async def test_a_pending_task_is_moved_up_the_queue(client: httpx.AsyncClient, api_store: Store) -> None:
    first, second, third = [await submit(client) for _ in range(3)]
    moved = await client.patch(f"/api/v1/tasks/{third['id']}", json={"priority": 10})
    assert moved.status_code == 200, moved.text
    assert (moved.json()["priority"], moved.json()["queue_position"]) == (10, 1)
    assert (await client.get(f"/api/v1/tasks/{first['id']}")).json()["queue_position"] == 2
    [claimed] = await api_store.claim_ids(
        "test-dispatcher", 30.0, [head.id for head in await api_store.peek_pending(limit=1)]
    )
    assert claimed.id == third["id"]

    body = assert_error_shape(
        await client.patch(f"/api/v1/tasks/{third['id']}", json={"priority": 1}), 409, "conflict"
    )
    assert "only a pending task" in body["message"]
    assert_error_shape(
        await client.patch("/api/v1/tasks/8c2ffa3a-4d8e-4a5e-9d1c-3b8f6a0e7c11", json={"priority": 1}),
        404,
        "not_found",
    )
    assert_error_shape(
        await client.patch(f"/api/v1/tasks/{second['id']}", json={"priority": 10**9}), 422, "validation_error"
    )
    assert_error_shape(
        await client.patch(f"/api/v1/tasks/{second['id']}", json={"priority": "high"}),
        422,
        "validation_error",
    )
    assert_error_shape(
        await client.patch(f"/api/v1/tasks/{second['id']}", json={"workflow_id": "x"}),
        422,
        "validation_error",
    )
    assert (await client.get(f"/api/v1/tasks/{second['id']}")).json()["priority"] == 0


async def test_cancel_pending_running_and_finished(client: httpx.AsyncClient, api_store: Store) -> None:
    pending = await submit(client)
    cancelled = await client.delete(f"/api/v1/tasks/{pending['id']}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["completed_at"] is not None
    assert_error_shape(await client.delete(f"/api/v1/tasks/{pending['id']}"), 409, "conflict")

    running = await submit(client)
    async with api_store.listen() as notifications:
        [claimed] = await api_store.claim_ids(
            "test-dispatcher", 30.0, [head.id for head in await api_store.peek_pending(limit=1)]
        )
        assert claimed.id == running["id"]
        response = await client.delete(f"/api/v1/tasks/{running['id']}")
        assert response.status_code == 202
        assert response.json()["status"] == "running"
        assert response.json()["cancel_requested"] is True
        note = await anext(notifications)
        while note.channel != "cancel":
            note = await anext(notifications)
        assert note.payload == running["id"]
    finished = await api_store.finish_cancelled(Lease(claimed.id, claimed.attempt, "test-dispatcher"))
    assert finished.status.value == "cancelled"
    assert (await client.get(f"/api/v1/tasks/{running['id']}")).json()["status"] == "cancelled"

    done = await submit(client)
    [claimed] = await api_store.claim_ids(
        "test-dispatcher", 30.0, [head.id for head in await api_store.peek_pending(limit=1)]
    )
    await api_store.complete_task(Lease(claimed.id, claimed.attempt, "test-dispatcher"), {"outputs": []})
    body = assert_error_shape(await client.delete(f"/api/v1/tasks/{done['id']}"), 409, "conflict")
    assert "completed" in body["message"]
    task = (await client.get(f"/api/v1/tasks/{done['id']}")).json()
    assert task["status"] == "completed"
    assert task["result"] == {"outputs": []}
    assert task["queue_position"] is None
    assert len(task["attempts"]) == 1
    assert parse_time(task["completed_at"]) >= parse_time(task["started_at"])


async def test_a_submission_wakes_the_dispatcher(client: httpx.AsyncClient, api_store: Store) -> None:
    async with api_store.listen() as notifications:
        created = await submit(client)
        note = await anext(notifications)
    assert note.channel == "tasks"
    assert created["id"] in note.payload


@pytest.mark.parametrize("task_id", ["3f1b0c9e-0000-4000-8000-000000000000", "no-such-task", "x" * 64])
async def test_unknown_task_is_404(client: httpx.AsyncClient, task_id: str) -> None:
    assert_error_shape(await client.get(f"/api/v1/tasks/{task_id}"), 404, "not_found")
    assert_error_shape(await client.delete(f"/api/v1/tasks/{task_id}"), 404, "not_found")


async def test_queue_metrics(client: httpx.AsyncClient, api_store: Store) -> None:
    empty = (await client.get("/api/v1/queue/metrics")).json()
    assert empty == {
        "pending_tasks": 0,
        "running_tasks": 0,
        "completed_tasks": 0,
        "failed_tasks": 0,
        "cancelled_tasks": 0,
        "oldest_pending_age_s": None,
    }
    for _ in range(3):
        await submit(client)
    await api_store.claim_ids(
        "test-dispatcher", 30.0, [head.id for head in await api_store.peek_pending(limit=1)]
    )
    metrics = (await client.get("/api/v1/queue/metrics")).json()
    assert metrics["pending_tasks"] == 2
    assert metrics["running_tasks"] == 1
    assert 0 <= metrics["oldest_pending_age_s"] < 60


async def test_health_and_ready(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).json() == {"status": "ready"}


async def test_store_outage_is_503_in_the_error_shape(store_url: str) -> None:
    from comfyfleet.config import Settings
    from comfyfleet.runtime import create_app
    from comfyfleet.store import open_store

    store = open_store(store_url)
    async with store:
        await store.migrate()
    app = create_app(Settings(store=store_url), store)  # the store is closed from here on
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://comfyfleet.test"
    ) as client:
        assert (await client.get("/health")).status_code == 200
        assert_error_shape(await client.get("/ready"), 503, "not_ready")
        response = await client.post("/api/v1/tasks", json=small_body())
        assert_error_shape(response, 503, "store_unavailable")
        assert response.headers["retry-after"] == "1"
        assert_error_shape(await client.get("/api/v1/tasks"), 503, "store_unavailable")


async def test_routing_errors_use_the_error_shape(client: httpx.AsyncClient) -> None:
    assert_error_shape(await client.get("/api/v1/nothing-here"), 404, "not_found")
    response = await client.put("/api/v1/tasks", json={})
    body = assert_error_shape(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET, POST"
    assert "GET, POST" in body["message"]


async def test_openapi_documents_every_route(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    for path, methods in {
        "/api/v1/tasks": ("get", "post"),
        "/api/v1/tasks/{task_id}": ("get", "delete"),
        "/api/v1/queue/metrics": ("get",),
        "/health": ("get",),
        "/ready": ("get",),
    }.items():
        for method in methods:
            operation = schema["paths"][path][method]
            assert operation.get("description"), (path, method)
    submit_op = schema["paths"]["/api/v1/tasks"]["post"]
    assert {"201", "200", "413", "422"} <= set(submit_op["responses"])
    assert "TaskOut" in schema["components"]["schemas"]
    assert "ErrorOut" in schema["components"]["schemas"]
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


async def test_the_readme_curl_example_is_the_seed_example_and_is_accepted(client: httpx.AsyncClient) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    match = re.search(r"curl -X POST http://localhost:8080/api/v1/tasks .*?-d '(\{.*?\})'\n```", readme, re.S)
    assert match, "the README has no curl example"
    body = json.loads(match[1])
    assert body == seed_body()
    response = await client.post("/api/v1/tasks", json=body)
    assert response.status_code == 201
    documented = re.search(r"`201 Created`.*?```json\n(\{.*?\n\})\n```", readme, re.S)
    assert documented, "the README does not show the response"
    assert set(json.loads(documented[1])) == set(response.json())


def test_task_ids_are_random_version_4_uuids() -> None:
    import uuid

    from comfyfleet.tasks.ids import TaskIds

    source = TaskIds()
    ids = [source() for _ in range(1000)]  # several refills of the randomness pool
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
