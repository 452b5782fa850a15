"""``GET /api/v2/jobs/{id}/events`` through the SDK's ``events()``: the snapshot, progress (throttled),
previews, outputs and the terminal status that ends the stream."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import pytest
from comfy_sdk import OutputReady, Preview, Progress, StatusChange

from support import Fleet, eventually, running_fleet, seed_workflow, tiny_workflow

ALICE = {"Authorization": "Bearer key-alice"}


@pytest.mark.slow
async def test_events_follow_a_job_to_its_end(sdk: Any) -> None:
    async with sdk() as client:
        job = await client.submit(client.workflows.from_json(seed_workflow(steps=150, seed=7)))
        seen: list[tuple[float, Any]] = []
        async for event in job.events():
            seen.append((time.monotonic(), event))
        events = [event for _, event in seen]
        assert isinstance(events[0], StatusChange)
        assert events[0].status in {"queued", "running"}
        assert events[-1] == StatusChange(status="succeeded")
        progress = [(at, event) for at, event in seen if isinstance(event, Progress)]
        assert progress, events
        assert all(0.0 <= event.value <= 1.0 for _, event in progress)
        assert any(event.steps == 150 for _, event in progress)
        # Throttled: about two a second (150 steps of 10 ms would otherwise be 150 events).
        assert len(progress) < 15
        gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(progress)]
        assert all(gap >= 0.4 for gap in gaps), gaps
        assert any(isinstance(event, Preview) and event.data.startswith(b"\xff\xd8") for event in events)
        [ready] = [event for event in events if isinstance(event, OutputReady)]
        assert ready.output.node_id == "9"
        assert (await ready.output.to_bytes()).startswith(b"\x89PNG")


async def test_an_ended_job_streams_its_final_status_at_once(sdk: Any) -> None:
    async with sdk() as client:
        job = await client.run(client.workflows.from_json(tiny_workflow()), timeout=30)
        events = [event async for event in job.events()]
        assert events == [StatusChange(status="succeeded")]


async def test_a_queued_job_hears_its_place_and_its_cancel(sdk: Any, fleet: Fleet) -> None:
    async with sdk() as client:
        # Four long jobs fill both workers (each runs one and holds one queued). Each names a checkpoint of
        # its own: jobs sharing one would rightly gather on the worker that has it loaded, leaving the other
        # worker free for the job below.
        busy = []
        for i in range(4):
            graph = seed_workflow(steps=3000, seed=i)
            graph["4"]["inputs"]["ckpt_name"] = f"busy-{i}.safetensors"
            busy.append(await client.submit(client.workflows.from_json(graph)))
        await eventually(
            lambda: sum(emulator.state.queue_remaining() for emulator in fleet.emulators) == 4,
            what="the four long jobs held by the workers",
        )
        waiting = await client.submit(client.workflows.from_json(tiny_workflow()))
        stream = waiting.events()
        first = await anext(stream)
        assert first == StatusChange(status="queued", queue_position=1)
        await waiting.cancel()
        assert [event async for event in stream][-1] == StatusChange(status="canceled")
        for job in busy:
            await job.cancel()


async def test_too_many_streams_are_refused(tmp_path: Path) -> None:
    settings = {"api_keys": [{"key": "key-alice", "tenant": "alice"}], "apiv2": {"max_event_streams": 1}}
    async with running_fleet(tmp_path, workers=1, emulator={"step_time_s": 0.01}, **settings) as fleet:
        created = await fleet.http.post(
            "/api/v2/jobs", json={"workflow": seed_workflow(steps=500)}, headers=ALICE
        )
        job_id = created.json()["id"]
        path = f"/api/v2/jobs/{job_id}/events"
        async with fleet.http.stream("GET", path, headers=ALICE) as first:
            assert first.status_code == 200
            lines = first.aiter_lines()
            assert await anext(lines) == "event: status"
            second = await fleet.http.get(path, headers=ALICE)
            assert second.status_code == 429
            assert second.json()["error"]["code"] == "too_many_streams"
            assert second.headers["retry-after"] == "5"
        await fleet.http.post(f"/api/v2/jobs/{job_id}/cancel", headers=ALICE)

        async def freed() -> bool:
            async with fleet.http.stream("GET", path, headers=ALICE) as again:
                return again.status_code == 200

        await eventually(freed, within=10)


@pytest.mark.postgres
async def test_events_reach_a_stream_on_another_replica(tmp_path: Path, postgres_url: str) -> None:
    settings = {"store": postgres_url, "api_keys": [{"key": "key-alice", "tenant": "alice"}]}
    async with (
        running_fleet(tmp_path / "a", workers=1, **settings) as submitting,
        running_fleet(tmp_path / "b", workers=0, wait_workers=0, **settings) as watching,
    ):
        created = await submitting.http.post(
            "/api/v2/jobs", json={"workflow": seed_workflow(steps=40)}, headers=ALICE
        )
        job_id = created.json()["id"]
        frames = await _frames(watching, f"/api/v2/jobs/{job_id}/events")
        assert frames[-1][0] == "status"
        assert '"succeeded"' in frames[-1][1]


async def _frames(fleet: Fleet, path: str) -> list[tuple[str, str]]:
    frames: list[tuple[str, str]] = []
    kind = ""
    async with fleet.http.stream("GET", path, headers=ALICE, timeout=30) as answer:
        assert answer.status_code == 200
        async for line in answer.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                frames.append((kind, line.removeprefix("data: ")))
    return frames
