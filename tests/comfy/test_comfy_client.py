"""ComfyClient against the emulator: following prompts through socket drops, restarts and the history race
(must show 3), typed errors, and frame parsing."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from pathlib import Path

import httpx
import pytest
from comfy_helpers import EmulatorFactory, new_id, sampler_graph, trivial_graph
from comfy_wire import frames_until, post_prompt
from comfy_wire import socket as ws_socket
from wire_server import RealSequenceServer

from comfyfleet.comfy import (
    ClientStateError,
    ComfyClient,
    ComfyEvent,
    OutputNotFound,
    PromptLost,
    WorkerUnreachable,
    WorkflowRejected,
)
from comfyfleet.comfy.events import parse_binary, parse_text
from comfyfleet.comfy.results import outcome_from_frames, outcome_from_history
from comfyfleet.emulators.comfyui import EmulatorServer
from support import eventually


async def test_submit_and_follow_collects_outputs_and_events(emulator_factory: EmulatorFactory) -> None:
    async with emulator_factory(step_time_s=0.002) as emu, ComfyClient(emu.url) as comfy:
        assert comfy.connected
        seen: list[ComfyEvent] = []
        prompt_id = new_id()
        submitted = await comfy.submit(sampler_graph(seed=11, steps=5), prompt_id=prompt_id)
        assert (submitted.prompt_id, submitted.node_errors) == (prompt_id, {})
        outcome = await comfy.follow(prompt_id, on_event=seen.append)
        assert outcome.ok
        assert outcome.status == "success"
        assert [f["filename"] for f in outcome.files()] == ["ComfyUI_00001_.png"]
        assert outcome.history["status"]["completed"] is True
        assert outcome.timings.execution_s is not None
        assert outcome.timings.queued_s is not None
        kinds = [event.type for event in seen]
        assert kinds[0] == "execution_start"
        assert {"progress", "executing", "executed", "execution_success"} <= set(kinds)
        assert seen[-1].is_done
        assert all(event.prompt_id == prompt_id for event in seen)
        assert next(e for e in seen if e.type == "progress").data["max"] == 5
        async with comfy.download("ComfyUI_00001_.png") as file:
            body = b"".join([chunk async for chunk in file.chunks])
        assert body[:4] == b"\x89PNG"
        with pytest.raises(OutputNotFound):
            async with comfy.download("nothing.png"):
                pass
        assert prompt_id not in comfy._watches  # followed prompts leave no buffer behind


async def test_socket_dropped_mid_prompt_the_outcome_is_still_learned(
    emulator_factory: EmulatorFactory,
) -> None:
    async with emulator_factory(step_time_s=0.02) as emu, ComfyClient(emu.url, poll_interval_s=0.05) as comfy:
        first_id = comfy.client_id
        prompt_id = new_id()
        await comfy.submit(sampler_graph(seed=21, steps=25), prompt_id=prompt_id)
        progress = asyncio.Event()

        def on_event(event: ComfyEvent) -> None:
            if event.type == "progress":
                progress.set()

        follower = asyncio.ensure_future(comfy.follow(prompt_id, on_event=on_event))
        await asyncio.wait_for(progress.wait(), 5)
        assert await emu.disconnect_sockets() == 1
        outcome = await asyncio.wait_for(follower, 10)
        assert outcome.status == "success"
        assert outcome.outputs["9"]["images"][0]["filename"].endswith(".png")
        assert comfy.reconnects >= 1
        await eventually(lambda: comfy.connected)
        assert comfy.client_id != first_id  # a fresh clientId for the new connection
        assert emu.stats.executions[prompt_id] == 1


async def test_server_restarted_mid_prompt_is_reported_lost(emulator_factory: EmulatorFactory) -> None:
    async with emulator_factory(step_time_s=0.02) as emu, ComfyClient(emu.url, poll_interval_s=0.05) as comfy:
        running, queued = new_id(), new_id()
        await comfy.submit(sampler_graph(seed=31, steps=200), prompt_id=running)
        await comfy.submit(trivial_graph(31), prompt_id=queued)
        started = asyncio.Event()
        follower = asyncio.ensure_future(comfy.follow(running, on_event=lambda e: started.set()))
        await asyncio.wait_for(started.wait(), 5)
        await emu.restart()
        with pytest.raises(PromptLost) as lost:
            await asyncio.wait_for(follower, 10)
        assert lost.value.prompt_id == running
        with pytest.raises(PromptLost):
            await comfy.follow(queued)


async def test_crashed_server_is_unreachable_then_lost_after_it_comes_back(
    emulator_factory: EmulatorFactory,
) -> None:
    async with emulator_factory(step_time_s=0.02, crash_after=0) as emu:
        async with ComfyClient(
            emu.url, poll_interval_s=0.02, max_poll_interval_s=0.05, unreachable_after_s=0.3
        ) as comfy:
            prompt_id = new_id()
            await comfy.submit(sampler_graph(seed=41), prompt_id=prompt_id)
            await asyncio.wait_for(emu.crashed.wait(), 5)
            with pytest.raises(WorkerUnreachable):
                await comfy.follow(prompt_id)
        async with ComfyClient(emu.url, poll_interval_s=0.02, unreachable_after_s=10) as comfy:
            follower = asyncio.ensure_future(comfy.follow(prompt_id))
            emu.options.crash_after = None
            await emu.restart()
            with pytest.raises(PromptLost):
                await asyncio.wait_for(follower, 10)


async def test_history_race_a_completion_always_comes_with_its_outputs(
    emulator_factory: EmulatorFactory,
) -> None:
    async with emulator_factory(history_delay_s=0.2) as emu, httpx.AsyncClient(base_url=emu.url) as http:
        # The race is real here: right after execution_success the history entry is still missing.
        async with ws_socket(emu.url, "naive") as ws:
            prompt_id = (await post_prompt(http, trivial_graph(51), client_id="naive")).json()["prompt_id"]
            await frames_until(ws, "execution_success")
            assert (await http.get(f"/history/{prompt_id}")).json() == {}
        async with ComfyClient(emu.url) as comfy:
            for color in (52, 53):
                prompt_id = new_id()
                await comfy.submit(trivial_graph(color), prompt_id=prompt_id)
                outcome = await comfy.follow(prompt_id)
                assert outcome.status == "success"
                assert outcome.outputs["2"]["images"][0]["subfolder"] == "probe"
        async with ComfyClient(emu.url, events=False, poll_interval_s=0.02) as polling:
            prompt_id = new_id()
            await polling.submit(trivial_graph(54), prompt_id=prompt_id)
            outcome = await polling.follow(prompt_id)
            assert outcome.outputs["2"]["images"]


async def test_interrupting_one_prompt_leaves_the_queued_one_alone(emulator_factory: EmulatorFactory) -> None:
    async with emulator_factory(step_time_s=0.02) as emu, ComfyClient(emu.url) as comfy:
        first, second = new_id(), new_id()
        await comfy.submit(sampler_graph(seed=61, steps=200), prompt_id=first)
        await comfy.submit(sampler_graph(seed=62, steps=3), prompt_id=second)
        queue = await comfy.queue()
        assert queue.is_running(first)
        assert [item.prompt_id for item in queue.pending] == [second]
        progress = asyncio.Event()
        follower = asyncio.ensure_future(
            comfy.follow(first, on_event=lambda e: progress.set() if e.type == "progress" else None)
        )
        await asyncio.wait_for(progress.wait(), 5)
        await comfy.interrupt(second)  # not running: a no-op
        await comfy.interrupt(first)
        interrupted = await asyncio.wait_for(follower, 5)
        assert interrupted.status == "interrupted"
        assert interrupted.error is not None
        assert interrupted.error["node_type"] == "KSampler"
        completed = await comfy.follow(second)
        assert completed.status == "success"
        assert (await comfy.job(first) or {})["status"] == "cancelled"
        assert emu.stats.prompts_interrupted == 1


async def test_failures_and_cancellation(emulator_factory: EmulatorFactory) -> None:
    async with emulator_factory(step_time_s=0.02) as emu, ComfyClient(emu.url) as comfy:
        failing = new_id()
        await comfy.submit(trivial_graph(71, prefix="../../escape"), prompt_id=failing)
        outcome = await comfy.follow(failing)
        assert outcome.status == "error"
        assert outcome.error is not None
        assert outcome.error["exception_type"] == "Exception"

        blocker, waiting = new_id(), new_id()
        await comfy.submit(sampler_graph(seed=72, steps=500), prompt_id=blocker)
        await comfy.submit(trivial_graph(72), prompt_id=waiting)
        await comfy.delete_from_queue([waiting])
        assert waiting not in await comfy.queue()
        with pytest.raises(PromptLost):
            await asyncio.wait_for(
                comfy.follow(waiting), 2
            )  # deleted from the queue: only a status frame says so
        assert await comfy.cancel_job(blocker) is True
        assert (await comfy.follow(blocker)).status == "interrupted"
        assert await comfy.cancel_job(blocker) is False
        assert await comfy.cancel_job(new_id()) is False
        assert await comfy.job(new_id()) is None
        assert await comfy.history(new_id()) is None
        await comfy.delete_history([failing, blocker])
        assert await comfy.history(failing) is None
        assert emu.state.history == {}


async def test_a_silent_socket_falls_back_to_polling(emulator: EmulatorServer) -> None:
    """Frames for a prompt routed to another client never reach us: the watchdog polls /api/jobs."""
    async with ComfyClient(emulator.url) as comfy:
        prompt_id = new_id()
        await comfy.submit(trivial_graph(81), prompt_id=prompt_id, client_id="somebody-else")
        started = time.monotonic()
        outcome = await comfy.follow(prompt_id, silence_s=0.2)
        assert outcome.status == "success"
        assert time.monotonic() - started < 2


async def test_front_jumps_the_queue(emulator_factory: EmulatorFactory) -> None:
    async with emulator_factory(step_time_s=0.01) as emu, ComfyClient(emu.url) as comfy:
        blocker, normal, urgent = new_id(), new_id(), new_id()
        await comfy.submit(sampler_graph(seed=91, steps=20), prompt_id=blocker)
        await comfy.submit(trivial_graph(91), prompt_id=normal)
        result = await comfy.submit(trivial_graph(92), prompt_id=urgent, front=True)
        assert result.number < 0
        assert [item.prompt_id for item in (await comfy.queue()).pending] == [urgent, normal]
        outcomes = [await comfy.follow(p) for p in (blocker, normal, urgent)]
        assert outcomes[2].timings.started_ms is not None
        assert outcomes[1].timings.started_ms is not None
        assert outcomes[2].timings.started_ms <= outcomes[1].timings.started_ms


async def test_rejections_and_typed_errors(emulator: EmulatorServer, tmp_path: Path) -> None:
    comfy = ComfyClient(emulator.url)
    with pytest.raises(ClientStateError):
        await comfy.system_stats()
    async with comfy:
        with pytest.raises(WorkflowRejected) as rejected:
            await comfy.submit({"1": {"class_type": "NoSuchNode", "inputs": {}}}, prompt_id=new_id())
        assert rejected.value.type == "missing_node_type"
        assert rejected.value.node_errors == {}
        bad = trivial_graph()
        del bad["1"]["inputs"]["width"]
        with pytest.raises(WorkflowRejected) as rejected:
            await comfy.submit(bad, prompt_id=new_id())
        assert rejected.value.node_errors["1"]["errors"][0]["type"] == "required_input_missing"
        with pytest.raises(WorkflowRejected) as rejected:
            await comfy.submit(trivial_graph(), prompt_id="NOT-A-UUID")
        assert rejected.value.type == "invalid_prompt_id"
        info = await comfy.object_info()
        assert await comfy.object_info() is info  # cached
        assert await comfy.object_info(refresh=True) == info
        assert "KSampler" in info
        assert (await comfy.system_stats())["system"]["comfyui_version"] == "0.33.0"
        uploaded = await comfy.upload_image(b"\x89PNG not really", "in.png", subfolder="job-1")
        assert uploaded == {"name": "in.png", "subfolder": "job-1", "type": "input"}
        await comfy.free(unload_models=True, free_memory=True)
    with pytest.raises(ClientStateError):
        await comfy.queue()

    async with ComfyClient("http://127.0.0.1:9", timeout=2) as nowhere:
        assert not nowhere.connected
        with pytest.raises(WorkerUnreachable):
            await nowhere.system_stats()
        with pytest.raises(WorkerUnreachable):
            await nowhere.submit(trivial_graph(), prompt_id=new_id())


def test_frame_parsing_never_breaks_on_odd_frames() -> None:
    text = parse_text(json.dumps({"type": "executing", "data": {"node": None, "prompt_id": "p"}}))
    assert text is not None
    assert text.is_done
    assert text.prompt_id == "p"
    assert parse_text("not json") is None
    assert parse_text("[1, 2]") is None
    legacy = parse_binary(struct.pack(">II", 1, 1) + b"\xff\xd8jpeg")
    assert legacy is not None
    assert (legacy.type, legacy.image_type, legacy.image, legacy.prompt_id) == (
        "preview",
        "image/jpeg",
        b"\xff\xd8jpeg",
        None,
    )
    metadata = json.dumps({"prompt_id": "p", "node_id": "3", "image_type": "image/png"}).encode()
    tagged = parse_binary(struct.pack(">II", 4, len(metadata)) + metadata + b"\x89PNG")
    assert tagged is not None
    assert (tagged.prompt_id, tagged.node, tagged.image) == ("p", "3", b"\x89PNG")
    assert parse_binary(struct.pack(">II", 4, 999) + b"{}") is None
    label = parse_binary(struct.pack(">II", 3, 1) + b"7hello")
    assert label is not None
    assert (label.type, label.node, label.text) == ("text", "7", "hello")
    assert parse_binary(b"\x00") is None
    unknown = parse_binary(struct.pack(">I", 42) + b"data")
    assert unknown is not None
    assert unknown.type == "binary"


async def test_binary_previews_reach_the_prompt_without_breaking_the_stream(
    emulator_factory: EmulatorFactory,
) -> None:
    async with emulator_factory(previews=True, step_time_s=0.001) as emu, ComfyClient(emu.url) as comfy:
        prompt_id = new_id()
        await comfy.submit(sampler_graph(seed=101, steps=3), prompt_id=prompt_id)
        previews: list[ComfyEvent] = []
        outcome = await comfy.follow(
            prompt_id, on_event=lambda e: previews.append(e) if e.type == "preview" else None
        )
        assert outcome.ok
        assert previews
        assert all(p.image is not None and p.image[:2] == b"\xff\xd8" for p in previews)
        assert all(
            p.prompt_id == prompt_id for p in previews
        )  # legacy frames carry no id: routed to the running prompt


async def test_a_prompt_whose_end_a_poll_learns_first_still_hands_over_every_frame() -> None:
    # Real ComfyUI's two status frames use up follow()'s short wait for execution_start; the poll that follows
    # is answered "completed" while the prompt's frames are still arriving. None may be lost.
    async with RealSequenceServer() as server, ComfyClient(server.url) as comfy:
        prompt_id = new_id()
        await comfy.submit(trivial_graph(), prompt_id=prompt_id)
        seen: list[ComfyEvent] = []
        outcome = await comfy.follow(prompt_id, on_event=seen.append)
        assert outcome.status == "success"
        assert server.polls >= 1  # the end was learned by polling, not from the socket
        assert [event.type for event in seen] == [
            "execution_start",
            "execution_cached",
            "progress_state",
            "executing",
            "progress_state",
            "progress_state",
            "executing",
            "executed",
            "progress_state",
            "execution_success",
            "executing",
        ]
        assert seen[-1].is_done
        assert all(event.prompt_id == prompt_id for event in seen)


async def test_a_success_read_from_its_frames_is_what_its_history_says(
    emulator_factory: EmulatorFactory,
) -> None:
    """``follow(from_frames=True)`` skips the history read when the socket carried the whole prompt: the outputs
    (a cached run's replayed ones too) and the times must be the history entry's own."""
    async with emulator_factory(step_time_s=0.001) as emu, ComfyClient(emu.url) as comfy:
        graph = sampler_graph(seed=5, steps=3)
        for run in ("first", "cached"):
            prompt_id = new_id()
            seen: list[ComfyEvent] = []
            await comfy.submit(graph, prompt_id=prompt_id)
            framed = await comfy.follow(prompt_id, on_event=seen.append, from_frames=True)
            history = await comfy.history(prompt_id)
            assert history is not None, run
            expected = outcome_from_history(prompt_id, history)
            assert framed.status == expected.status == "success"
            assert framed.outputs == expected.outputs, run
            assert framed.files()
            assert framed.files() == expected.files()
            assert (framed.timings.started_ms, framed.timings.ended_ms) == (
                expected.timings.started_ms,
                expected.timings.ended_ms,
            )
            assert framed.history["status"]["completed"] is True
            assert outcome_from_frames(prompt_id, seen) == framed  # built from exactly these frames
    # A failure is never read from frames: it is the history's to tell.
    async with emulator_factory(failure_rate=1.0) as emu, ComfyClient(emu.url) as comfy:
        prompt_id = new_id()
        seen: list[ComfyEvent] = []
        await comfy.submit(sampler_graph(seed=6, steps=2), prompt_id=prompt_id)
        failed = await comfy.follow(prompt_id, on_event=seen.append, from_frames=True)
        assert failed.status == "error"
        assert failed.error is not None
        assert outcome_from_frames(prompt_id, seen) is None
