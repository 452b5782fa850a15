"""Input no store can keep is refused at the door, the same way on SQLite and PostgreSQL (the shared ``store``
fixture runs each test on both): a NUL character or a lone surrogate in any string or key of a submission, a
NaN, a NUL in a query parameter. The answer is a 422 naming the place (the gateway's ``/prompt``: ComfyUI's
400), nothing is stored, and every listing keeps answering. Bodies nested too deeply for Python's JSON reader,
and upload names the output storage keeps for itself, are 4xx answers too."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import API_KEYS, assert_error_shape, bearer

from comfyfleet.config import PoolConfig, Settings
from comfyfleet.domain import NewTask
from comfyfleet.outputs import open_outputs
from comfyfleet.runtime import create_app
from comfyfleet.store import Store

NUL, SURROGATE = "x\x00y", "x\ud800y"
GRAPH: dict[str, Any] = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "text": "ok"}}}


@pytest.fixture
async def http(store: Store, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(store=store.url, api_keys=API_KEYS, pools=[PoolConfig(name="gpu")])
    app = create_app(settings, store, outputs=open_outputs(str(tmp_path / "outputs")))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://comfyfleet.test"
    ) as client:
        yield client


def _graph_with(bad: str, where: str) -> dict[str, Any]:
    graph = json.loads(json.dumps(GRAPH))
    if where == "value":
        graph["1"]["inputs"]["text"] = ["fine", {"deep": bad}]
    elif where == "key":
        graph["1"]["inputs"][bad] = 1
    elif where == "node_id":
        graph[bad] = graph.pop("1")
    elif where == "class_type":
        graph["1"]["class_type"] = bad
    return graph


def _body(bad: str, field: str) -> tuple[dict[str, Any], list[Any]]:
    """A submission with ``bad`` text in ``field``, and the location the API must name."""
    shown = bad.replace("\x00", "\\u0000").replace("\ud800", "\\ud800")  # as the answer spells a key
    bodies: dict[str, tuple[dict[str, Any], list[Any]]] = {
        "payload value": (
            {"payload": _graph_with(bad, "value")},
            ["body", "payload", "1", "inputs", "text", 1, "deep"],
        ),
        "payload key": ({"payload": _graph_with(bad, "key")}, ["body", "payload", "1", "inputs", shown]),
        "node id": ({"payload": _graph_with(bad, "node_id")}, ["body", "payload", shown]),
        "class_type": ({"payload": _graph_with(bad, "class_type")}, ["body", "payload", "1", "class_type"]),
        "workflow_id": ({"payload": GRAPH, "workflow_id": bad}, ["body", "workflow_id"]),
        "pool": ({"payload": GRAPH, "pool": bad}, ["body", "pool"]),
        "metadata": ({"payload": GRAPH, "metadata": {"a": [{"b": bad}]}}, ["body", "metadata", "a", 0, "b"]),
        "metadata key": ({"payload": GRAPH, "metadata": {bad: 1}}, ["body", "metadata", shown]),
        "inputs": (
            {"payload": GRAPH, "inputs": [{"name": bad, "url": "https://example.com/a.png"}]},
            ["body", "inputs", 0, "name"],
        ),
        "webhook": ({"payload": GRAPH, "webhook": f"https://example.com/{bad}"}, ["body", "webhook", "url"]),
    }
    return bodies[field]


def _raw(body: dict[str, Any]) -> bytes:
    # json.dumps spells NUL and lone surrogates as \u escapes, as a client's JSON would.
    return json.dumps(body).encode()


async def _listings_answer(http: httpx.AsyncClient) -> None:
    """Every listing, the tenant's and the administrator's, answers 200 with JSON."""
    for who in ("alice", "ops"):
        for path in ("/api/v1/tasks", "/api/v1/tasks?include=payload", "/history", "/queue"):
            response = await http.get(path, headers=bearer(who))
            assert response.status_code == 200, (who, path, response.text)
            response.json()


FIELDS = [
    "payload value",
    "payload key",
    "node id",
    "class_type",
    "workflow_id",
    "pool",
    "metadata",
    "metadata key",
    "inputs",
    "webhook",
]


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "lone_surrogate"])
@pytest.mark.parametrize("field", FIELDS)
async def test_unstorable_text_anywhere_in_a_submission_is_a_422_naming_it(
    http: httpx.AsyncClient, store: Store, bad: str, field: str
) -> None:
    body, loc = _body(bad, field)
    response = await http.post(
        "/api/v1/tasks", content=_raw(body), headers={**bearer("alice"), "content-type": "application/json"}
    )
    error = assert_error_shape(response, 422)
    [problem] = error["details"]["errors"]
    assert problem["loc"] == loc
    if error["error"] == "validation_error":  # a typed string field: the request model refuses it already
        assert (bad, problem["type"]) == (SURROGATE, "string_unicode")
    else:
        assert error["error"] == "invalid_text"
        assert problem["type"] == ("nul_character" if bad == NUL else "lone_surrogate")
    assert (await store.queue_metrics()).pending_tasks == 0  # refused before anything was stored
    await _listings_answer(http)


async def test_a_nul_in_the_idempotency_key_is_refused_as_a_header(
    http: httpx.AsyncClient, store: Store
) -> None:
    response = await http.post(
        "/api/v1/tasks", json={"payload": GRAPH}, headers={**bearer("alice"), "Idempotency-Key": "k\x00"}
    )
    error = assert_error_shape(response, 422, "invalid_text")
    assert error["details"]["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert (await store.queue_metrics()).pending_tasks == 0


async def test_nan_and_infinity_are_refused_on_both_stores(http: httpx.AsyncClient, store: Store) -> None:
    for number, spelled in ((float("nan"), "NaN"), (float("inf"), "Infinity"), (float("-inf"), "-Infinity")):
        raw = json.dumps({"payload": GRAPH, "metadata": {"score": number}})
        assert spelled in raw
        response = await http.post(
            "/api/v1/tasks", content=raw, headers={**bearer("alice"), "content-type": "application/json"}
        )
        error = assert_error_shape(response, 422, "invalid_text")
        assert error["details"]["errors"][0]["loc"] == ["body", "metadata", "score"]
    assert (await store.queue_metrics()).pending_tasks == 0


@pytest.mark.parametrize(
    ("path", "loc"),
    [
        ("/api/v1/tasks?workflow_id=a%00b", ["query", "workflow_id"]),
        ("/api/v1/tasks?status=pending&cursor=%00", ["query", "cursor"]),
        ("/api/v1/workers?pool=gpu%00", ["query", "pool"]),
        ("/history?max_items=1%00", ["query", "max_items"]),
        ("/api/v1/tasks?a%00=1", ["query", "a\\u0000"]),
    ],
)
async def test_a_nul_in_a_query_parameter_is_a_422(
    http: httpx.AsyncClient, path: str, loc: list[str]
) -> None:
    error = assert_error_shape(await http.get(path, headers=bearer("ops")), 422, "invalid_text")
    assert error["details"]["errors"][0]["loc"] == loc


@pytest.mark.parametrize("path", ["/api/v1/workers/w%00", "/api/v1/tasks/%00", "/history/%00", "/x%00"])
async def test_a_nul_in_a_path_names_nothing(http: httpx.AsyncClient, path: str) -> None:
    assert_error_shape(await http.get(path, headers=bearer("ops")), 404, "not_found")


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "lone_surrogate"])
async def test_the_gateway_refuses_the_same_text_in_comfyuis_shape(
    http: httpx.AsyncClient, store: Store, bad: str
) -> None:
    for body, details in (
        ({"prompt": _graph_with(bad, "value")}, "prompt.1.inputs.text.1.deep"),
        ({"prompt": GRAPH, "client_id": bad}, "client_id"),
        ({"prompt": GRAPH, "extra_data": {"note": bad}}, "extra_data.note"),
        ({"prompt": _graph_with(bad, "key")}, None),
        # A file reference is looked up among the uploads first: the lookup must not fail on it either.
        ({"prompt": {"1": {"class_type": "LoadImage", "inputs": {"image": bad}}}}, "prompt.1.inputs.image"),
    ):
        response = await http.post("/prompt", content=_raw(body), headers=bearer("alice"))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_text", error
        if details is not None:
            assert error["details"] == details
            assert error["message"].startswith(details)
    assert (await store.queue_metrics()).pending_tasks == 0
    await _listings_answer(http)


async def test_after_a_refused_poison_submission_every_listing_still_answers(
    http: httpx.AsyncClient, store: Store
) -> None:
    accepted = await http.post("/api/v1/tasks", json={"payload": GRAPH}, headers=bearer("bob"))
    assert accepted.status_code == 201, accepted.text
    for bad in (NUL, SURROGATE):
        for field in FIELDS:
            body, _ = _body(bad, field)
            refused = await http.post(
                "/api/v1/tasks",
                content=_raw(body),
                headers={**bearer("alice"), "content-type": "application/json"},
            )
            assert refused.status_code == 422, (field, refused.text)
    await _listings_answer(http)
    one = await http.get(f"/api/v1/tasks/{accepted.json()['id']}", headers=bearer("ops"))
    assert one.status_code == 200
    listed = (await http.get("/api/v1/tasks", headers=bearer("ops"))).json()
    assert [task["id"] for task in listed["tasks"]] == [accepted.json()["id"]]


async def test_a_task_stored_with_a_lone_surrogate_before_the_check_does_not_break_answers(
    sqlite_store: Store, tmp_path: Path
) -> None:
    # Only SQLite could store one (PostgreSQL always refused): an installation upgraded with such a row.
    task, _ = await sqlite_store.create_task(
        NewTask(payload=_graph_with(SURROGATE, "value"), tenant="alice", metadata={"k": SURROGATE})
    )
    app = create_app(Settings(store=sqlite_store.url, api_keys=API_KEYS), sqlite_store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        await _listings_answer(http)
        one = await http.get(f"/api/v1/tasks/{task.id}", headers=bearer("alice"))
        assert one.status_code == 200
        assert one.json()["metadata"] == {"k": SURROGATE}  # JSON's \ud800 escape, read back as it was sent
        listed = await http.get("/api/v1/tasks?include=payload", headers=bearer("ops"))
        assert listed.json()["tasks"][0]["payload"]["1"]["inputs"]["text"][1]["deep"] == SURROGATE


DEEP = 100_000


async def test_a_body_nested_too_deeply_is_a_400_at_both_doors(http: httpx.AsyncClient) -> None:
    deep = "[" * DEEP + "]" * DEEP
    rest = await http.post(
        "/api/v1/tasks",
        content='{"payload": {"1": {"class_type": "A", "inputs": {"x": ' + deep + "}}}}",
        headers={**bearer("alice"), "content-type": "application/json"},
    )
    assert assert_error_shape(rest, 400, "invalid_json")["message"] == (
        "the request body is nested too deeply to be read"
    )
    for path in ("/prompt", "/queue", "/interrupt"):
        comfy = await http.post(path, content='{"prompt": ' + deep + "}", headers=bearer("alice"))
        assert comfy.status_code in (200, 400), (
            path,
            comfy.text,
        )  # /interrupt and /queue tolerate, as ComfyUI
    comfy = await http.post("/prompt", content='{"prompt": ' + deep + "}", headers=bearer("alice"))
    assert comfy.status_code == 400
    assert comfy.json()["error"]["type"] == "invalid_json"


async def test_a_value_nested_deeper_than_copying_allows_is_a_400_on_the_gateway(
    http: httpx.AsyncClient, store: Store
) -> None:
    # Readable by the JSON reader, but deeper than a recursive copy of the graph could go.
    graph = {"1": {"class_type": "A", "inputs": {"x": json.loads("[" * 700 + "]" * 700)}}}
    response = await http.post("/prompt", content=json.dumps({"prompt": graph}), headers=bearer("alice"))
    assert response.status_code == 400, response.text
    assert "nested deeper" in json.dumps(response.json())
    assert (await store.queue_metrics()).pending_tasks == 0


async def test_an_upload_named_like_the_storages_own_files_is_a_400(http: httpx.AsyncClient) -> None:
    for name in ("image.content-type", "sub.content-type"):
        response = await http.post(
            "/upload/image",
            files={"image": (name, b"\x89PNG data", "image/png")},
            headers=bearer("alice"),
        )
        assert response.status_code == 400, (name, response.text)
    deep = "[" * DEEP + "]" * DEEP
    mask = await http.post(
        "/upload/mask",
        files={"image": ("mask.png", b"\x89PNG data", "image/png")},
        data={"original_ref": deep},
        headers=bearer("alice"),
    )
    assert mask.status_code == 400, mask.text
    fine = await http.post(
        "/upload/image", files={"image": ("image.png", b"\x89PNG data", "image/png")}, headers=bearer("alice")
    )
    assert fine.status_code == 200, fine.text
