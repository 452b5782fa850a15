"""The Python SDK: ``comfyfleet.Client`` and ``comfyfleet.AsyncClient`` against a running comfyfleet."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

import comfyfleet
from comfyfleet import AsyncClient, Client
from comfyfleet.sdk import (
    Conflict,
    InputFileError,
    InvalidWorkflow,
    NotFound,
    ServerUnreachable,
    TaskEvent,
    TaskFailed,
    Unauthorized,
    WaitTimeout,
)
from support import running_fleet, seed_workflow, tiny_workflow


def test_importing_comfyfleet_stays_cheap() -> None:
    code = "import sys, comfyfleet; assert 'httpx' not in sys.modules and 'fastapi' not in sys.modules; print(comfyfleet.__all__)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "AsyncClient" in result.stdout
    assert comfyfleet.Client is Client


async def test_async_client_submits_follows_waits_and_downloads(tmp_path: Path) -> None:
    async with (
        running_fleet(tmp_path, workers=1, emulator={"step_time_s": 0.01}) as fleet,
        AsyncClient(fleet.url) as client,
    ):
        events: list[TaskEvent] = []
        task = await client.run(
            seed_workflow(),
            priority=2,
            workflow_id="seed",
            metadata={"who": "sdk"},
            on_event=events.append,
            timeout=30,
        )
        assert task.ok
        assert task.priority == 2
        assert task.raw["metadata"] == {"who": "sdk"}
        kinds = [event.type for event in events]
        assert kinds[0] == "snapshot"
        assert "progress" in kinds
        assert events[-1].is_terminal
        assert events[-1].status == "completed"
        assert any(e.data.get("class_type") == "KSampler" and e.data.get("value") == 20 for e in events)
        [output] = task.outputs
        assert output.node_id == "9"
        assert output.content_type == "image/png"
        [saved] = await client.download(task, tmp_path / "out")
        with Image.open(saved) as image:
            assert image.size == (512, 512)
        assert await client.read_output(output) == saved.read_bytes()

        page = await client.list_tasks(status="completed", limit=10)
        assert [listed.id for listed in page.tasks] == [task.id]
        assert page.next_cursor is None
        assert page.tasks[0].payload is None  # lists leave the graph out unless asked
        assert (await client.get(task.id)).payload == seed_workflow()
        with_graph = await client.list_tasks(status="completed", include_payload=True)
        assert with_graph.tasks[0].payload == seed_workflow()
        assert (await client.queue_metrics())["completed_tasks"] == 1

        # Typed errors, one per decision.
        broken = tiny_workflow()
        broken["2"]["inputs"]["images"] = ["404", 0]
        with pytest.raises(InvalidWorkflow) as rejected:
            await client.submit(broken)
        assert rejected.value.errors[0]["node_id"] == "2"
        with pytest.raises(NotFound):
            await client.get("00000000-0000-4000-8000-000000000000")
        with pytest.raises(Conflict):
            await client.cancel(task.id)
        failed = await client.run(seed_workflow(sampler_name="nope"), timeout=30)
        assert failed.status == "failed"
        with pytest.raises(TaskFailed) as raised:
            failed.raise_for_status()
        assert raised.value.node_errors["3"]["class_type"] == "KSampler"


@pytest.mark.slow
def test_blocking_client_in_ordinary_code(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_fleet(tmp_path, workers=1, emulator={"prompt_time_s": 1}) as fleet:
            await asyncio.to_thread(use_blocking_client, fleet.url, tmp_path)

    asyncio.run(scenario())


def use_blocking_client(url: str, tmp_path: Path) -> None:
    picture = io.BytesIO()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(picture, format="PNG")
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "copy"}},
    }
    with Client(url) as client:
        task = client.submit(graph, inputs={"in.png": picture.getvalue()})
        assert task.status == "pending"
        assert task.raw["inputs"][0]["name"] == "in.png"
        with pytest.raises(WaitTimeout):
            client.wait(task.id, timeout=0.3)  # the worker takes 1 s; the task keeps running
        done = client.wait(task.id, timeout=30)
        assert done.ok
        [saved] = client.download(done.id, tmp_path / "blocking")
        with Image.open(saved) as image:
            assert image.size == (20, 10)
        second = client.submit(tiny_workflow(color=5))
        third = client.submit(tiny_workflow(color=6))
        cancelled = client.cancel(third.id)
        assert cancelled.status in ("cancelled", "running")
        assert client.wait(third.id, timeout=30).status == "cancelled"
        assert client.wait(second.id, timeout=30).ok
        events = list(client.events(second.id))
        assert [event.type for event in events] == ["snapshot"]  # an ended task: just where it stands
        ran = client.run(tiny_workflow(color=11), timeout=30)  # answered by the submission itself (?wait=)
        assert ran.ok
        assert ran.outputs[0].kind == "images"


async def test_unreachable_server_and_wrong_key() -> None:
    with pytest.raises(ServerUnreachable) as unreachable:
        async with AsyncClient("http://127.0.0.1:9") as client:
            await client.get("00000000-0000-4000-8000-000000000000")
    assert "127.0.0.1:9" in str(unreachable.value)
    with pytest.raises(ServerUnreachable), Client("127.0.0.1:9") as client:
        client.queue_metrics()


async def test_api_key_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_fleet(tmp_path, workers=0, api_keys=[{"key": "k-123", "tenant": "acme"}]) as fleet:
        monkeypatch.setenv("COMFYFLEET_URL", fleet.url)
        monkeypatch.setenv("COMFYFLEET_CLIENT_CONFIG", str(tmp_path / "none.yaml"))
        async with AsyncClient() as anonymous:
            with pytest.raises(Unauthorized):
                await anonymous.list_tasks()
        monkeypatch.setenv("COMFYFLEET_API_KEY", "k-123")
        async with AsyncClient() as client:
            task = await client.submit(tiny_workflow())
            assert task.raw["tenant"] == "acme"
        # An explicit transport (e.g. in-process ASGI) is honoured.
        transport = httpx.ASGITransport(app=fleet.runtime.app)
        async with AsyncClient("http://in-process", api_key="k-123", transport=transport) as direct:
            assert (await direct.get(task.id)).id == task.id


async def test_a_missing_input_file_is_the_sdks_own_error(tmp_path: Path) -> None:
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}}}
    missing = tmp_path / "photos" / "cat.png"
    with Client("127.0.0.1:9") as client, pytest.raises(InputFileError) as error:
        client.submit(graph, inputs={"cat.png": missing})  # refused before any request is made
    assert isinstance(error.value, comfyfleet.ComfyfleetError)
    assert str(missing) in str(error.value)
    assert "No such file" in error.value.reason
    with Client("127.0.0.1:9") as client, pytest.raises(InputFileError, match="Is a directory"):
        client.submit(graph, inputs={"cat.png": tmp_path})


async def test_drain_and_undrain_a_worker(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=1) as fleet:
        [worker] = fleet.runtime.services.fleet.usable_workers()
        async with AsyncClient(fleet.url) as client:
            assert (await client.drain_worker(worker.id))["state"] == "draining"
            assert (await client.undrain_worker(worker.id))["state"] == "idle"
            with pytest.raises(NotFound):
                await client.undrain_worker("no-such-worker")

        def blocking() -> None:
            with Client(fleet.url) as client:
                assert client.drain_worker(worker.id)["state"] == "draining"
                assert client.undrain_worker(worker.id)["state"] == "idle"

        await asyncio.to_thread(blocking)
        # Undrained, the worker runs tasks again.
        async with AsyncClient(fleet.url) as client:
            assert (await client.run(tiny_workflow(color=12), timeout=30)).ok
