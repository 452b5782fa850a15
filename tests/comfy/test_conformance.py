"""Conformance of ComfyClient with a ComfyUI server: the emulator in CI, a real ComfyUI when COMFYUI_URL is set.

    COMFYUI_URL=http://127.0.0.1:8188 .venv/bin/python -m pytest tests/comfy/test_conformance.py

Only model-free workflows are used (EmptyImage, ImageBlur, LoadImage, ImageScale, SaveImage), with inputs
varied per run so that ComfyUI's node cache never serves them. The "slow" workflow blurs 8 images of
1024x1024 on a real server (seconds on a CPU, as measured in the protocol reference); the emulator makes
its ImageBlur hang 0.5 s instead, deaf to interrupts like the real node.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from comfy_helpers import EmulatorFactory
from PIL import Image

from comfyfleet.comfy import ComfyClient, ComfyEvent, PromptLost, WorkflowRejected

REAL_SERVER = os.environ.get("COMFYUI_URL")


@pytest.fixture
async def comfy_url(emulator_factory: EmulatorFactory) -> AsyncIterator[str]:
    if REAL_SERVER:
        yield REAL_SERVER.rstrip("/")
        return
    async with emulator_factory(hang_node="ImageBlur", hang_s=0.5) as emulator:
        yield emulator.url


@pytest.fixture
async def comfy(comfy_url: str) -> AsyncIterator[ComfyClient]:
    async with ComfyClient(comfy_url, poll_interval_s=0.05) as client:
        yield client


def _color() -> int:
    return random.randrange(0, 0xFFFFFF)


def _prompt_id() -> str:
    return str(uuid.uuid4())


def _trivial(size: int = 64) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": _color()},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": "conformance/empty"},
        },
    }


def _slow() -> dict[str, Any]:
    size, batch = (1024, 8) if REAL_SERVER else (64, 1)
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": batch, "color": _color()},
        },
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 10.0}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "conformance/slow"},
        },
    }


async def test_health_probe_and_catalogue(comfy: ComfyClient) -> None:
    stats = await comfy.system_stats()
    assert stats["system"]["comfyui_version"]
    assert isinstance(stats["devices"], list)
    info = await comfy.object_info()
    for name in ("EmptyImage", "ImageBlur", "ImageScale", "LoadImage", "SaveImage", "KSampler"):
        assert name in info
    assert info["SaveImage"]["output_node"] is True
    assert info["EmptyImage"]["output_node"] is False
    assert list(info["EmptyImage"]["input"]["required"]) == ["width", "height", "batch_size", "color"]


async def test_trivial_prompt_round_trip(comfy: ComfyClient) -> None:
    prompt_id = _prompt_id()
    submitted = await comfy.submit(_trivial(48), prompt_id=prompt_id)
    assert submitted.prompt_id == prompt_id
    assert submitted.node_errors == {}
    kinds: list[str] = []
    outcome = await comfy.follow(prompt_id, on_event=lambda event: kinds.append(event.type))
    assert outcome.status == "success"
    assert "execution_start" in kinds
    assert kinds[-1] == "executing"
    (image,) = outcome.files()
    assert image["subfolder"] == "conformance"
    assert image["type"] == "output"
    async with comfy.download(image["filename"], image["subfolder"]) as response:
        data = await response.read()
    with Image.open(io.BytesIO(data)) as png:
        assert png.size == (48, 48)
    job = await comfy.job(prompt_id)
    assert job is not None
    assert job["status"] == "completed"
    assert await comfy.history(prompt_id) is not None
    await comfy.delete_history([prompt_id])
    assert await comfy.history(prompt_id) is None


async def test_rejected_workflows(comfy: ComfyClient) -> None:
    with pytest.raises(WorkflowRejected) as unknown:
        await comfy.submit({"1": {"class_type": "NoSuchNodeAnywhere", "inputs": {}}}, prompt_id=_prompt_id())
    assert unknown.value.type == "missing_node_type"
    missing = _trivial()
    del missing["1"]["inputs"]["height"]
    with pytest.raises(WorkflowRejected) as rejected:
        await comfy.submit(missing, prompt_id=_prompt_id())
    assert rejected.value.type == "prompt_outputs_failed_validation"
    assert rejected.value.node_errors["1"]["errors"][0]["type"] == "required_input_missing"
    with pytest.raises(WorkflowRejected) as bad_id:
        await comfy.submit(_trivial(), prompt_id=_prompt_id().upper())
    assert bad_id.value.type == "invalid_prompt_id"


async def test_queue_delete_interrupt_and_cancel(comfy: ComfyClient) -> None:
    slow, doomed, after = _prompt_id(), _prompt_id(), _prompt_id()
    # The interrupt must land while the slow node (ImageBlur, node 2) runs, not during the first node: on a
    # real server the prompt shows as running in /queue ~250 ms before its blur starts.
    blur_started = asyncio.Event()

    def on_frame(event: ComfyEvent) -> None:
        if event.type == "executing" and event.prompt_id == slow and event.node == "2":
            blur_started.set()

    stop_listening = comfy.add_listener(on_frame)
    await comfy.submit(_slow(), prompt_id=slow)
    await comfy.submit(_trivial(), prompt_id=doomed)
    await comfy.submit(_trivial(), prompt_id=after)
    queue = await comfy.queue()
    assert slow in queue
    assert [item.number for item in queue.pending] == sorted(item.number for item in queue.pending)
    await comfy.delete_from_queue([doomed])
    assert doomed not in await comfy.queue()
    assert await comfy.job(doomed) is None

    # Interrupt by prompt_id once its blur runs; ImageBlur has no progress bar, so it stops at the next node.
    await asyncio.wait_for(blur_started.wait(), 60)
    stop_listening()
    await comfy.interrupt(after)  # not running yet: a no-op
    await comfy.interrupt(slow)
    outcome = await comfy.follow(slow)
    assert outcome.status == "interrupted"
    assert outcome.error is not None
    assert outcome.error["node_type"] == "SaveImage"
    assert (await comfy.follow(after)).status == "success"
    with pytest.raises(PromptLost):
        await asyncio.wait_for(comfy.follow(doomed), 5)  # only a status frame tells
    assert await comfy.cancel_job(slow) is False
    assert await comfy.cancel_job(_prompt_id()) is False
    assert (await comfy.job(slow) or {}).get("status") == "cancelled"


async def test_upload_then_load_image(comfy: ComfyClient) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (_color() % 256, 10, 200)).save(buffer, format="PNG")
    subfolder = f"conformance-{uuid.uuid4().hex[:8]}"
    uploaded = await comfy.upload_image(buffer.getvalue(), "source.png", subfolder=subfolder)
    assert uploaded == {"name": "source.png", "subfolder": subfolder, "type": "input"}
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": f"{subfolder}/source.png"}},
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "bilinear",
                "width": 200,
                "height": 100,
                "crop": "disabled",
            },
        },
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "conformance/scaled"},
        },
    }
    prompt_id = _prompt_id()
    await comfy.submit(graph, prompt_id=prompt_id)
    outcome = await comfy.follow(prompt_id)
    assert outcome.status == "success"
    (image,) = outcome.files()
    async with comfy.download(image["filename"], image["subfolder"]) as response:
        with Image.open(io.BytesIO(await response.read())) as png:
            assert png.size == (200, 100)


async def test_polling_only_client_and_free(comfy_url: str) -> None:
    async with ComfyClient(comfy_url, events=False, poll_interval_s=0.05) as polling:
        prompt_id = _prompt_id()
        await polling.submit(_trivial(), prompt_id=prompt_id)
        outcome = await polling.follow(prompt_id)
        assert outcome.status == "success"
        assert outcome.files()
        await polling.free(unload_models=False, free_memory=True)
