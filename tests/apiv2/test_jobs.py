"""Comfy API v2 jobs, driven by the official SDK (``comfy-sdk``, unchanged) against a fleet of two emulator
workers: a v2 job is a comfyfleet task, submitted through the task service like any other."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from comfy_sdk import IdempotencyKeyReuse, InvalidWorkflow, NotFound
from comfy_sdk.exceptions import ComfyError

from support import Fleet, eventually, seed_workflow, tiny_workflow

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}


def slow_workflow(steps: int = 400) -> dict[str, Any]:
    """The seed's KSampler graph: ``steps`` sampler steps of the emulator's step time (10 ms here)."""
    return seed_workflow(steps=steps, seed=steps)


async def test_run_waits_for_the_outputs_and_downloads_them(sdk: Any, fleet: Fleet) -> None:
    async with sdk() as client:
        job = await client.run(client.workflows.from_json(tiny_workflow()), timeout=30)
        assert job.status == "succeeded"
        [output] = job.get_outputs("2")
        assert (output.type, output.content_type, output.job_id) == ("image", "image/png", job.id)
        data = await output.to_bytes()
        assert data.startswith(b"\x89PNG")
        assert len(data) == output.size_bytes
        assert await output.to_bytes(range=(1, 3)) == data[1:4]

    # The same job, as comfyfleet's own API shows it: one task, with the same file.
    task = (await fleet.http.get(f"/api/v1/tasks/{job.id}", headers=ALICE)).json()
    assert task["status"] == "completed"
    [stored] = task["result"]["outputs"]
    assert stored["filename"] == output.name
    download = await fleet.http.get(stored["url"], headers=ALICE)
    assert download.content == data


async def test_a_job_reads_back_with_its_timings_labels_and_workflow(sdk: Any) -> None:
    graph = tiny_workflow(color=0x102030)
    async with sdk() as client:
        job = await client.submit(client.workflows.from_json(graph), metadata={"batch": "b-1"})
        assert job.metadata == {"batch": "b-1"}
        await job.result()
        again = await client.jobs.get(job.id)
        raw = again._model
        assert raw.started_at is not None
        assert raw.completed_at is not None
        assert raw.created_at <= raw.started_at <= raw.completed_at
        assert raw.metrics is not None
        assert raw.metrics["execution_ms"] is not None
        assert raw.progress is not None
        assert raw.progress.value == 1.0
        assert raw.urls.self == f"/api/v2/jobs/{job.id}"
        workflow = await again.get_workflow()
        assert (workflow.format, workflow.graph) == ("api", graph)


async def test_an_idempotency_key_is_used_once_and_never_runs_twice(sdk: Any, fleet: Fleet) -> None:
    async with sdk() as client:
        workflow = client.workflows.from_json(tiny_workflow())
        first = await client.submit(workflow, idempotency_key="order-17")
        with pytest.raises(IdempotencyKeyReuse) as reused:
            await client.submit(workflow, idempotency_key="order-17")
        assert reused.value.code == "idempotency_key_reuse"
        assert reused.value.http_status == 422
        # A different request under the same key is refused as well: the key is not a replay handle.
        with pytest.raises(IdempotencyKeyReuse):
            await client.submit(
                client.workflows.from_json(tiny_workflow(color=1)), idempotency_key="order-17"
            )
        await first.result()
    tasks = (await fleet.http.get("/api/v1/tasks", headers=ALICE)).json()["tasks"]
    assert [task["id"] for task in tasks] == [first.id]


async def test_a_key_whose_submission_was_refused_can_be_used_again(sdk: Any) -> None:
    broken = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    async with sdk() as client:
        with pytest.raises(InvalidWorkflow):
            await client.submit(client.workflows.from_json(broken), idempotency_key="retry-me")
        job = await client.submit(client.workflows.from_json(tiny_workflow()), idempotency_key="retry-me")
        assert (await job.result()).status == "succeeded"


async def test_keys_are_per_tenant(sdk: Any) -> None:
    async with sdk("key-alice") as alice, sdk("key-bob") as bob:
        await alice.submit(alice.workflows.from_json(tiny_workflow()), idempotency_key="shared-name")
        job = await bob.submit(bob.workflows.from_json(tiny_workflow()), idempotency_key="shared-name")
        assert job.status in {"queued", "running", "succeeded"}


async def test_a_graph_with_an_unknown_node_is_refused_with_per_node_details(sdk: Any, fleet: Fleet) -> None:
    graph = tiny_workflow()
    graph["3"] = {"class_type": "NoSuchNode", "inputs": {"images": ["1", 0]}}
    async with sdk() as client:
        with pytest.raises(InvalidWorkflow) as refused:
            await client.submit(client.workflows.from_json(graph))
    assert refused.value.code == "invalid_workflow"
    assert refused.value.http_status == 422
    assert "3" in refused.value.details["node_errors"]
    assert (await fleet.http.get("/api/v1/tasks", headers=ALICE)).json()["tasks"] == []


async def test_list_jobs_filters_by_label_and_pages(sdk: Any) -> None:
    async with sdk() as client:
        submitted = []
        for index in range(5):
            label = {"run": "a" if index % 2 == 0 else "b"}
            job = await client.submit(client.workflows.from_json(tiny_workflow(color=index)), metadata=label)
            submitted.append(job.id)
        listed = [summary.id async for summary in client.list_jobs(limit=2)]
        assert listed == submitted[::-1]
        only_a = [summary async for summary in client.list_jobs(metadata={"run": "a"}, limit=2)]
        assert [summary.id for summary in only_a] == submitted[::-2]
        assert all(summary.metadata == {"run": "a"} for summary in only_a)
        assert only_a[0].create_time is not None


async def test_list_jobs_refuses_what_it_cannot_do(fleet: Fleet) -> None:
    for query, code in [
        ({"limit": "101"}, "invalid_request"),
        ({"status": "sleeping"}, "invalid_request"),
        ({"cursor": "not-a-cursor"}, "invalid_cursor"),
        ({f"metadata[k{i}]": "v" for i in range(4)}, "invalid_metadata_filter"),
    ]:
        answer = await fleet.http.get("/api/v2/jobs", params=query, headers=ALICE)
        assert answer.status_code == 400, query
        assert answer.json()["error"]["code"] == code


async def test_labels_are_checked(sdk: Any) -> None:
    async with sdk() as client:
        for labels in [{"bad key!": "x"}, {"k": "line\nbreak"}, {f"k{i}": "v" for i in range(17)}]:
            with pytest.raises(ComfyError) as refused:
                await client.submit(client.workflows.from_json(tiny_workflow()), metadata=labels)
            assert (refused.value.code, refused.value.http_status) == ("metadata_invalid", 422)


async def test_another_tenants_job_is_not_found(sdk: Any, fleet: Fleet) -> None:
    async with sdk("key-alice") as alice, sdk("key-bob") as bob:
        job = await alice.submit(alice.workflows.from_json(tiny_workflow()))
        with pytest.raises(NotFound):
            await bob.jobs.get(job.id)
        for method, path in [("GET", ""), ("GET", "/workflow"), ("POST", "/cancel"), ("GET", "/events")]:
            answer = await fleet.http.request(method, f"/api/v2/jobs/{job.id}{path}", headers=BOB)
            assert answer.status_code == 404
            assert answer.json()["error"]["code"] == "not_found"
        assert [summary.id async for summary in bob.list_jobs()] == []
        await job.result()


async def test_cancel_stops_a_running_job_and_is_idempotent(sdk: Any, fleet: Fleet) -> None:
    async with sdk() as client:
        job = await client.submit(client.workflows.from_json(slow_workflow()))

        async def running() -> bool:
            return (await job.refresh()).status == "running"

        await eventually(running, within=15)
        await job.cancel()
        assert job.status in {"canceling", "canceled"}
        await job.wait(timeout=15)
        assert job.status == "canceled"
        assert job.error is None
        again = await job.cancel()  # cancelling an ended job answers it as it is
        assert again.status == "canceled"
    task = (await fleet.http.get(f"/api/v1/tasks/{job.id}", headers=ALICE)).json()
    assert task["status"] == "cancelled"


async def test_cancel_of_a_queued_job_is_at_once(sdk: Any) -> None:
    async with sdk() as client:
        # Four long jobs fill both workers (one running and one queued on each), so the fifth waits in comfyfleet.
        busy = [await client.submit(client.workflows.from_json(slow_workflow(3000 + i))) for i in range(4)]
        queued = await client.submit(client.workflows.from_json(slow_workflow(2999)))
        assert queued.status == "queued"
        assert queued._model.queue_position is not None
        await queued.cancel()
        assert queued.status == "canceled"
        for job in busy:
            await job.cancel()
        await asyncio.gather(*(job.wait(timeout=20) for job in busy))


async def test_errors_use_v2_envelope_and_health_is_open(fleet: Fleet) -> None:
    health = await fleet.http.get("/api/v2/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    for headers in [{}, {"Authorization": "Bearer wrong"}]:
        answer = await fleet.http.get("/api/v2/jobs", headers=headers)
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "unauthorized"
    checks: list[tuple[dict[str, Any], int, str]] = [
        ({"workflow": {"nodes": [], "links": [], "last_node_id": 0}}, 422, "workflow_format_ui"),
        ({"workflow": tiny_workflow(), "webhook_url": "https://example.com"}, 422, "invalid_request"),
        ({"workflow": tiny_workflow(), "extra_data": {"other": 1}}, 422, "invalid_request"),
        (
            {"workflow": tiny_workflow(), "extra_data": {"api_key_comfy_org": "k"}},
            422,
            "extra_data_not_supported",
        ),
        ({"workflow": "not a graph"}, 422, "invalid_request"),
        ({"workflow": tiny_workflow(), "priority": 10**9}, 422, "invalid_request"),
    ]
    for body, status, code in checks:
        answer = await fleet.http.post("/api/v2/jobs", json=body, headers=ALICE)
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), body
    answer = await fleet.http.post("/api/v2/jobs", content=b"{not json", headers=ALICE)
    assert (answer.status_code, answer.json()["error"]["code"]) == (400, "invalid_request")
    answer = await fleet.http.get("/api/v2/nowhere", headers=ALICE)
    assert (answer.status_code, answer.json()["error"]["code"]) == (404, "not_found")
    too_big = b"{" + b" " * (fleet.settings.limits.max_body_bytes + 1) + b"}"
    answer = await fleet.http.post("/api/v2/jobs", content=too_big, headers=ALICE)
    assert (answer.status_code, answer.json()["error"]["code"]) == (413, "payload_too_large")


async def test_a_v2_job_shows_in_v1_and_metrics(sdk: Any, fleet: Fleet) -> None:
    async with sdk() as client:
        job = await client.run(client.workflows.from_json(tiny_workflow()), timeout=30)
    listed = (await fleet.http.get("/api/v1/tasks", headers=ALICE)).json()["tasks"]
    assert [task["id"] for task in listed] == [job.id]
    metrics = (await fleet.http.get("/metrics")).text
    assert 'status="completed"' in metrics
