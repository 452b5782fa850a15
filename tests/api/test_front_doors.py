"""The REST API and the ComfyUI gateway hand submissions to one task service: a bad submission is refused
by both for the same reason, each in its own shape (REST: 422 ``{"error": code, …}``; the gateway: ComfyUI's
400 ``{"error": {"type", …}, "node_errors"}``), and nothing is stored."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import assert_error_shape

from comfyfleet.config import Limits, PoolConfig
from comfyfleet.domain.graph import UI_FORMAT_HELP
from comfyfleet.store import Store
from support import seed_body

MakeClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
async def client(make_client: MakeClient) -> AsyncIterator[httpx.AsyncClient]:
    # A configured pool with no worker up: the gateway checks graphs for their shape, as REST does.
    async with make_client(
        pools=[PoolConfig(name="gpu", labels=["sdxl"])],
        limits=Limits(min_priority=-10, max_priority=10, max_nodes=20),
    ) as opened:
        yield opened


async def both_refuse(
    client: httpx.AsyncClient, payload: dict[str, Any], **options: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Submit the same graph and options through both front doors; their error bodies."""
    rest = await client.post("/api/v1/tasks", json={"payload": payload, **options})
    comfy = await client.post(
        "/prompt", json={"prompt": copy.deepcopy(payload), "extra_data": {"comfyfleet": options}}
    )
    assert comfy.status_code == 400, comfy.text
    assert set(comfy.json()) == {"error", "node_errors"}
    return assert_error_shape(rest, 422), comfy.json()


async def test_an_unknown_pool_is_refused_by_both_front_doors(
    client: httpx.AsyncClient, api_store: Store
) -> None:
    rest, comfy = await both_refuse(client, seed_body()["payload"], pool="gpus")
    assert rest["error"] == comfy["error"]["type"] == "unknown_pool"
    assert rest["message"] == comfy["error"]["message"]
    assert "'gpus'" in rest["message"]
    assert "gpu, sdxl" in rest["message"]
    assert rest["details"]["errors"][0]["loc"] == ["body", "pool"]
    assert comfy["error"]["details"] == "extra_data.comfyfleet.pool"
    assert (await api_store.queue_metrics()).pending_tasks == 0
    # A pool or a label of one is accepted at both doors.
    accepted = await client.post(
        "/prompt", json={"prompt": seed_body()["payload"], "extra_data": {"comfyfleet": {"pool": "sdxl"}}}
    )
    assert accepted.status_code == 200, accepted.text
    task = (await client.get(f"/api/v1/tasks/{accepted.json()['prompt_id']}")).json()
    assert task["pool"] == "sdxl"


async def test_an_invalid_graph_is_refused_by_both_front_doors_node_by_node(
    client: httpx.AsyncClient, api_store: Store
) -> None:
    payload = seed_body()["payload"]
    del payload["4"]  # three inputs now link to a missing node
    payload["9"]["inputs"]["images"] = ["8", -1]
    rest, comfy = await both_refuse(client, payload)
    assert rest["error"] == "invalid_graph"
    rest_problems = {
        (entry["node_id"], entry["input_name"], entry["type"]) for entry in rest["details"]["errors"]
    }
    assert comfy["error"]["type"] == "prompt_outputs_failed_validation"
    comfy_problems = {
        (node_id, error["extra_info"]["input_name"], error["type"])
        for node_id, entry in comfy["node_errors"].items()
        for error in entry["errors"]
    }
    assert (
        rest_problems
        == comfy_problems
        == {
            ("3", "model", "link_to_missing_node"),
            ("6", "clip", "link_to_missing_node"),
            ("7", "clip", "link_to_missing_node"),
            ("8", "vae", "link_to_missing_node"),
            ("9", "images", "invalid_link"),
        }
    )
    assert (await api_store.queue_metrics()).pending_tasks == 0


async def test_a_priority_out_of_range_and_a_graph_too_large_are_refused_by_both(
    client: httpx.AsyncClient, api_store: Store
) -> None:
    rest, comfy = await both_refuse(client, seed_body()["payload"], priority=11)
    assert rest["details"]["errors"][0]["type"] == "priority_out_of_range"
    assert comfy["error"]["type"] == "invalid_priority"
    assert rest["message"] == comfy["error"]["message"]
    assert "-10" in rest["message"]

    large = {str(index): {"class_type": "EmptyImage", "inputs": {}} for index in range(21)}
    rest, comfy = await both_refuse(client, large)
    assert rest["error"] == "invalid_graph"
    assert rest["details"]["errors"][0]["type"] == "too_many_nodes"
    assert comfy["error"]["type"] == "prompt_too_large"
    assert rest["message"].endswith(comfy["error"]["message"])
    assert (await api_store.queue_metrics()).pending_tasks == 0


async def test_the_gateway_queue_length_is_fresh_after_a_submission_through_either_door(
    client: httpx.AsyncClient,
) -> None:
    async def queue_remaining() -> int:
        remaining: int = (await client.get("/prompt")).json()["exec_info"]["queue_remaining"]
        return remaining

    assert await queue_remaining() == 0  # read, and kept for a moment
    assert (await client.post("/prompt", json={"prompt": seed_body()["payload"]})).status_code == 200
    assert await queue_remaining() == 1
    created = await client.post("/api/v1/tasks", json=seed_body())
    assert created.status_code == 201
    assert await queue_remaining() == 2
    assert (await client.delete(f"/api/v1/tasks/{created.json()['id']}")).status_code == 200
    assert await queue_remaining() == 1


UI_FORMAT_WORKFLOW: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "usage" / "data" / "ui_format_workflow.json").read_text()
)


async def test_a_ui_format_workflow_is_refused_by_both_front_doors_with_the_export_help(
    client: httpx.AsyncClient, api_store: Store
) -> None:
    rest, comfy = await both_refuse(client, UI_FORMAT_WORKFLOW)
    assert rest["error"] == comfy["error"]["type"] == "workflow_format_ui"
    assert rest["message"] == comfy["error"]["message"]
    assert UI_FORMAT_HELP in rest["message"]
    assert rest["details"]["errors"][0]["loc"] == ["body", "payload"]
    assert comfy["error"]["details"] == "prompt"
    # The exported file posted as it is, without its wrapper: the same answer, about the whole body.
    bare_rest = assert_error_shape(await client.post("/api/v1/tasks", json=UI_FORMAT_WORKFLOW), 422)
    assert bare_rest["error"] == "workflow_format_ui"
    assert bare_rest["details"]["errors"][0]["loc"] == ["body"]
    bare_comfy = await client.post("/prompt", json=UI_FORMAT_WORKFLOW)
    assert bare_comfy.status_code == 400
    assert bare_comfy.json()["error"]["type"] == "workflow_format_ui"
    assert UI_FORMAT_HELP in bare_comfy.json()["error"]["message"]
    assert (await api_store.queue_metrics()).pending_tasks == 0


async def test_a_bare_graph_as_the_body_is_told_to_wrap_it(
    client: httpx.AsyncClient, api_store: Store
) -> None:
    graph = seed_body()["payload"]
    rest = assert_error_shape(await client.post("/api/v1/tasks", json=graph), 422, "payload_not_wrapped")
    assert '{"payload": <the graph>}' in rest["message"]
    assert rest["details"]["errors"] == [
        {"loc": ["body"], "message": "a bare workflow graph", "type": "payload_not_wrapped"}
    ]
    comfy = await client.post("/prompt", json=graph)
    assert comfy.status_code == 400
    assert comfy.json()["error"]["type"] == "no_prompt"  # ComfyUI's own type, with a hint
    assert '{"prompt": <the graph>}' in comfy.json()["error"]["details"]
    # Something that is neither a graph nor a task keeps the usual field-by-field answer.
    other = assert_error_shape(
        await client.post("/api/v1/tasks", json={"priority": 1}), 422, "validation_error"
    )
    assert other["details"]["errors"][0]["loc"] == ["body", "payload"]
    assert (await api_store.queue_metrics()).pending_tasks == 0
