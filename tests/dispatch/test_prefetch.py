"""Output files fetched while a prompt finishes: what a node's ``executed`` frame announced is fetched at once,
handed over once for the history entry's item that names it, and anything else is left to the collector."""

from __future__ import annotations

import uuid

from comfyfleet.comfy import ComfyClient, ComfyEvent
from comfyfleet.dispatch.prefetch import Prefetch
from comfyfleet.emulators.comfyui.options import EmulatorOptions
from support import emulators, tiny_workflow


async def test_announced_files_are_fetched_once_and_others_are_left_alone() -> None:
    async with emulators(EmulatorOptions()) as (worker,), ComfyClient(worker.url) as comfy:
        prefetch = Prefetch(comfy)

        def on_event(event: ComfyEvent) -> None:
            if event.type == "executed":
                prefetch.announced((event.data or {}).get("output"))

        prompt_id = str(uuid.uuid4())
        await comfy.submit(tiny_workflow(color=7), prompt_id=prompt_id)
        outcome = await comfy.follow(prompt_id, on_event=on_event)
        (item,) = outcome.files()
        async with comfy.download(item["filename"], item["subfolder"], item["type"]) as file:
            on_disk = await file.read()
        prefetch.announced(
            {"images": [{"filename": "gone.png", "subfolder": "", "type": "output"}], "text": ["x"]}
        )

        fetched = await prefetch.take(item)
        assert fetched is not None
        assert fetched.content == on_disk
        assert on_disk.startswith(b"\x89PNG")
        assert fetched.content_type == "image/png"
        assert await prefetch.take(item) is None  # handed over once
        assert await prefetch.take({"filename": "gone.png", "type": "output"}) is None  # the worker had none
        assert await prefetch.take({"filename": "never-announced.png"}) is None
        prefetch.cancel()
