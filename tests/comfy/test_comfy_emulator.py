"""The emulator speaks ComfyUI 0.33's protocol as the reference measured it (raw HTTP and WebSocket)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from comfy_helpers import EmulatorFactory, new_id, sampler_graph, seed_payload, trivial_graph
from comfy_wire import frames_until, frames_until_done, next_json, post_prompt, types
from comfy_wire import socket as ws_socket
from PIL import Image

from comfyfleet.emulators.comfyui import EmulatorOptions, EmulatorServer
from support import eventually


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _start_cli(tmp_path: Path, *args: str) -> tuple[asyncio.subprocess.Process, str]:
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfyfleet", "emulator", "--port", str(port), "--base-dir", str(tmp_path / "cli"), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(20):
        line = (await process.stdout.readline()).decode()
    assert "listening on http://127.0.0.1:" in line, line
    return process, f"http://127.0.0.1:{port}"


async def test_cli_emulator_runs_the_seed_payload_end_to_end(tmp_path: Path) -> None:
    """Must show 1: the seed payload posted straight to `comfyfleet emulator`."""
    process, url = await _start_cli(tmp_path)
    try:
        async with httpx.AsyncClient(base_url=url) as http, ws_socket(url, "client-x") as ws:
            hello = await next_json(ws)
            assert hello == {
                "type": "status",
                "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "client-x"},
            }
            response = await post_prompt(http, seed_payload(), client_id="client-x")
            assert response.status_code == 200
            body = response.json()
            assert set(body) == {"prompt_id", "number", "node_errors"}
            assert body["node_errors"] == {}
            frames = await frames_until_done(ws, body["prompt_id"])
            sequence = [t for t in types(frames) if t not in ("progress_state", "progress")]
            executing = [f["data"]["node"] for f in frames if f["type"] == "executing"]
            assert sequence[:4] == ["status", "status", "execution_start", "execution_cached"]
            assert sequence[-4:] == ["executed", "execution_success", "status", "executing"]
            assert sorted(executing[:-1]) == ["3", "4", "5", "6", "7", "8", "9"]
            assert executing[-1] is None
            assert "progress" in types(frames)  # the KSampler reports its steps

            history = (await http.get(f"/history/{body['prompt_id']}")).json()[body["prompt_id"]]
            image = history["outputs"]["9"]["images"][0]
            assert image == {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}
            view = await http.get("/view", params=image)
            assert view.status_code == 200
            assert view.headers["content-type"] == "image/png"
            with Image.open(io.BytesIO(view.content)) as png:
                assert (png.format, png.size) == ("PNG", (512, 512))
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await process.wait() == 0


async def test_cli_crash_after_exits_the_process(tmp_path: Path) -> None:
    process, url = await _start_cli(tmp_path, "--crash-after", "1")
    async with httpx.AsyncClient(base_url=url) as http, ws_socket(url, "c") as ws:
        first = (await post_prompt(http, trivial_graph(1), client_id="c")).json()["prompt_id"]
        await frames_until_done(ws, first)
        await post_prompt(http, trivial_graph(2), client_id="c")
        async with asyncio.timeout(10):
            assert await process.wait() == 70
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=url) as http:
            await http.get("/system_stats")


async def test_trivial_prompt_frames_match_the_live_sequence(emulator: EmulatorServer) -> None:
    async with httpx.AsyncClient(base_url=emulator.url) as http, ws_socket(emulator.url, "a") as ws:
        await next_json(ws)
        prompt_id = (await post_prompt(http, trivial_graph(7), client_id="a")).json()["prompt_id"]
        frames = await frames_until_done(ws, prompt_id)
        assert types(frames) == [
            "status", "status", "execution_start", "execution_cached", "progress_state", "executing",
            "progress_state", "progress_state", "executing", "executed", "progress_state", "execution_success",
            "status", "executing",
        ]  # fmt: skip
        assert [
            f["data"]["status"]["exec_info"]["queue_remaining"] for f in frames if f["type"] == "status"
        ] == [1, 1, 0]
        assert frames[3]["data"]["nodes"] == []
        assert frames[5]["data"] == {"node": "1", "display_node": "1", "prompt_id": prompt_id}
        assert frames[9]["data"]["output"] == {
            "images": [{"filename": "empty_00001_.png", "subfolder": "probe", "type": "output"}]
        }
        assert frames[-1]["data"] == {"node": None, "prompt_id": prompt_id}

        # An identical resubmission is served from the node cache: replayed UI, same file, no executing{node}.
        again = (await post_prompt(http, trivial_graph(7), client_id="a")).json()["prompt_id"]
        cached = await frames_until_done(ws, again)
        assert types(cached) == [
            "status",
            "status",
            "execution_start",
            "execution_cached",
            "executed",
            "execution_success",
            "status",
            "executing",
        ]
        assert cached[3]["data"]["nodes"] == ["1", "2"]
        assert cached[4]["data"]["output"]["images"][0]["filename"] == "empty_00001_.png"
        assert sorted(os.listdir(Path(emulator.output_dir) / "probe")) == ["empty_00001_.png"]


async def test_frames_are_routed_by_client_id(emulator_factory: EmulatorFactory) -> None:
    async with (
        emulator_factory(step_time_s=0.001) as emu,
        httpx.AsyncClient(base_url=emu.url) as http,
        ws_socket(emu.url, "owner") as owner,
        ws_socket(emu.url, "other") as other,
        ws_socket(emu.url) as anonymous,
    ):
        assert len((await next_json(anonymous))["data"]["sid"]) == 32  # a generated uuid4 hex
        await next_json(owner)
        await next_json(other)
        prompt_id = (await post_prompt(http, sampler_graph(seed=3), client_id="owner")).json()["prompt_id"]
        await frames_until_done(owner, prompt_id)
        # A prompt without a client_id: progress is broadcast, execution frames go nowhere.
        orphan = (await post_prompt(http, sampler_graph(seed=4))).json()["prompt_id"]
        await eventually(lambda: emu.state.history.get(orphan) is not None)
        marker = (await post_prompt(http, trivial_graph(5), client_id="other")).json()["prompt_id"]
        seen_by_other = await frames_until_done(other, marker)
        before_marker = seen_by_other[
            : next(i for i, f in enumerate(seen_by_other) if f["type"] == "execution_start")
        ]
        assert {f["type"] for f in before_marker} == {"status", "progress", "progress_state"}
        assert all(f["data"]["prompt_id"] == orphan for f in before_marker if f["type"] == "progress")
        assert not any(f["data"].get("prompt_id") == prompt_id for f in seen_by_other)


async def test_reusing_a_client_id_orphans_the_new_socket_like_upstream(emulator: EmulatorServer) -> None:
    async with httpx.AsyncClient(base_url=emulator.url) as http, ws_socket(emulator.url, "dup") as second:
        async with ws_socket(emulator.url, "dup") as first:
            await next_json(first)
        await eventually(lambda: "dup" not in emulator.state.sockets)
        await next_json(second)  # its own hello arrived before the first socket closed
        prompt_id = (await post_prompt(http, trivial_graph(11), client_id="dup")).json()["prompt_id"]
        await eventually(lambda: prompt_id in emulator.state.history)
        with pytest.raises(TimeoutError):
            await frames_until(second, "execution_start", within=0.3)


async def test_routes_answer_under_api_alias_and_unknown_ones_404(emulator: EmulatorServer) -> None:
    async with httpx.AsyncClient(base_url=emulator.url) as http:
        assert (await http.get("/api/prompt")).json() == {"exec_info": {"queue_remaining": 0}}
        assert (await http.get("/api/api/jobs")).status_code == 200
        assert (await http.get("/api/jobs")).status_code == 200
        assert (await http.get("/jobs")).status_code == 404
        for missing in ("/health", "/api/history_v2", "/api/workflows"):
            assert (await http.get(missing)).status_code == 404
        assert (await http.get("/ws")).status_code == 400
        assert (await http.get("/api/system_stats")).json()["system"]["comfyui_version"] == "0.33.0"
        assert (await http.get("/features")).json()["supports_preview_metadata"] is True
    async with ws_socket(emulator.url, "via-api", path="/api/ws") as ws:
        assert (await next_json(ws))["data"]["sid"] == "via-api"


async def test_bad_bodies_get_upstreams_status_codes(emulator: EmulatorServer) -> None:
    async with httpx.AsyncClient(base_url=emulator.url) as http:
        for path in ("/prompt", "/queue", "/free", "/history"):
            response = await http.post(path, content=b"{not json")
            assert response.status_code == 500, path
            assert response.headers["content-type"].startswith("text/plain")
            assert response.text.startswith("500 Internal Server Error")
        assert (await http.post("/prompt", json={"prompt": "not a dict"})).status_code == 500
        assert (await http.get("/history", params={"max_items": "abc"})).status_code == 500
        assert (await http.post("/interrupt", content=b"{not json")).status_code == 200
        bad_cancel = await http.post("/api/jobs/cancel", content=b"{not json")
        assert bad_cancel.status_code == 400
        assert "error" in bad_cancel.json()
        invalid = await http.post("/api/jobs/cancel", json={"job_ids": ["nope", new_id()]})
        assert invalid.status_code == 400
        assert invalid.json() == {"error": "job_ids contains invalid id(s)", "invalid_ids": ["nope"]}
        bad_jobs = await http.get("/api/jobs", params={"status": "finished"})
        assert bad_jobs.status_code == 400
        assert "error" in bad_jobs.json()


async def test_prompt_id_must_be_a_canonical_uuid_and_is_not_deduplicated(emulator: EmulatorServer) -> None:
    async with httpx.AsyncClient(base_url=emulator.url) as http:
        for bad in (new_id().upper(), "my-prompt", 17):
            response = await post_prompt(http, trivial_graph(1), prompt_id=bad)
            assert response.status_code == 400
            assert response.json()["error"]["type"] == "invalid_prompt_id"
            assert response.json()["node_errors"] == {}
        minted = (await post_prompt(http, trivial_graph(1), prompt_id=None)).json()["prompt_id"]
        assert str(__import__("uuid").UUID(minted)) == minted
        chosen = new_id()
        first = await post_prompt(http, trivial_graph(2), prompt_id=chosen)
        second = await post_prompt(http, trivial_graph(3), prompt_id=chosen)
        assert first.json()["prompt_id"] == second.json()["prompt_id"] == chosen
        assert second.json()["number"] == first.json()["number"] + 1
        await eventually(
            lambda: (
                emulator.stats.executions.get(chosen) == 2
                and not emulator.state.heap
                and not emulator.state.running
            )
        )
        history = (await http.get(f"/history/{chosen}")).json()[chosen]
        assert history["prompt"][2]["1"]["inputs"]["color"] == 3  # the second overwrote the first


async def test_queue_is_a_heap_honouring_front_and_delete_touches_pending_only(
    emulator_factory: EmulatorFactory,
) -> None:
    async with emulator_factory(step_time_s=0.02) as emu, httpx.AsyncClient(base_url=emu.url) as http:
        j1, j2, j3, j4 = new_id(), new_id(), new_id(), new_id()
        await post_prompt(http, sampler_graph(seed=1, steps=500), prompt_id=j1)
        await eventually(lambda: emu.state.running is not None and emu.state.running.prompt_id == j1)
        await post_prompt(http, sampler_graph(seed=2, steps=5), prompt_id=j2)
        await post_prompt(http, trivial_graph(3), prompt_id=j3)
        await post_prompt(http, trivial_graph(4), prompt_id=j4, front=True, client_id="someone")
        queue = (await http.get("/queue")).json()
        assert [item[1] for item in queue["queue_running"]] == [j1]
        assert len(queue["queue_running"][0]) == 5
        pending = {item[1]: item[0] for item in queue["queue_pending"]}
        assert set(pending) == {j2, j3, j4}
        assert pending[j4] < 0 < pending[j2] < pending[j3]
        assert (await http.get("/prompt")).json() == {"exec_info": {"queue_remaining": 4}}

        assert (await http.post("/queue", json={"delete": [j3, j1]})).status_code == 200
        queue = (await http.get("/queue")).json()
        assert [item[1] for item in queue["queue_running"]] == [j1]
        assert sorted(item[1] for item in queue["queue_pending"]) == sorted([j2, j4])
        await http.post("/interrupt", json={"prompt_id": j2})  # not running: a no-op
        assert (await http.get(f"/api/jobs/{j1}")).json()["status"] == "in_progress"
        await http.post("/interrupt", json={"prompt_id": j1})
        await eventually(lambda: emu.state.running is not None and emu.state.running.prompt_id == j2)
        assert (await http.post(f"/api/jobs/{j2}/cancel")).json() == {"cancelled": True}
        await eventually(lambda: j2 in emu.state.history)
        assert (await http.post(f"/api/jobs/{j2}/cancel")).json() == {"cancelled": False}
        statuses = {j: (await http.get(f"/api/jobs/{j}")) for j in (j1, j2, j3, j4)}
        assert statuses[j3].status_code == 404
        assert statuses[j3].json() == {"error": "Job not found"}
        assert [statuses[j].json()["status"] for j in (j1, j2, j4)] == ["cancelled", "cancelled", "completed"]
        started = {j: emu.state.history[j]["status"]["messages"][0][1]["timestamp"] for j in (j1, j2, j4)}
        assert started[j1] <= started[j4] <= started[j2]  # front jumped the queue
        assert (await http.get(f"/history/{j3}")).json() == {}


async def test_interrupt_stops_a_sampler_between_steps(emulator_factory: EmulatorFactory) -> None:
    async with emulator_factory(step_time_s=0.05) as emu, httpx.AsyncClient(base_url=emu.url) as http:
        async with ws_socket(emu.url, "i") as ws:
            prompt_id = (await post_prompt(http, sampler_graph(steps=200), client_id="i")).json()["prompt_id"]
            await frames_until(ws, "progress")
            asked = time.monotonic()
            await http.post("/interrupt", json={"prompt_id": prompt_id})
            frames = await frames_until_done(ws, prompt_id)
            assert time.monotonic() - asked < 1.0
            interrupted = next(f for f in frames if f["type"] == "execution_interrupted")
            assert interrupted["data"]["node_id"] == "3"
            assert interrupted["data"]["node_type"] == "KSampler"
            assert types(frames)[-2:] == ["status", "executing"]
        entry = (await http.get(f"/history/{prompt_id}")).json()[prompt_id]
        assert entry["status"]["status_str"] == "error"
        assert entry["status"]["completed"] is False
        assert entry["status"]["messages"][-1][0] == "execution_interrupted"
        # The global form (no body) interrupts whatever runs.
        other = (await post_prompt(http, sampler_graph(seed=9, steps=200))).json()["prompt_id"]
        await eventually(lambda: emu.state.running is not None)
        await http.post("/interrupt")
        await eventually(lambda: other in emu.state.history)
        assert (await http.get(f"/api/jobs/{other}")).json()["status"] == "cancelled"


async def test_history_and_jobs_shapes(emulator: EmulatorServer) -> None:
    async with httpx.AsyncClient(base_url=emulator.url) as http, ws_socket(emulator.url, "h") as ws:
        ids = []
        for color in (1, 2, 3):
            prompt_id = (
                await post_prompt(
                    http,
                    trivial_graph(color),
                    client_id="h",
                    extra_data={"extra_pnginfo": {"workflow": {"id": "wf-1"}}},
                )
            ).json()["prompt_id"]
            await frames_until_done(ws, prompt_id)
            ids.append(prompt_id)
        entry = (await http.get(f"/history/{ids[0]}")).json()[ids[0]]
        _, prompt_id, graph, extra_data, outputs = entry["prompt"]
        assert (prompt_id, outputs, extra_data["client_id"]) == (ids[0], ["2"], "h")
        assert isinstance(extra_data["create_time"], int)
        assert graph["1"]["class_type"] == "EmptyImage"
        assert entry["status"]["status_str"] == "success"
        assert entry["status"]["completed"] is True
        assert [m[0] for m in entry["status"]["messages"]] == [
            "execution_start",
            "execution_cached",
            "execution_success",
        ]
        assert entry["meta"] == {
            "2": {"node_id": "2", "display_node": "2", "parent_node": None, "real_node_id": "2"}
        }
        assert list((await http.get("/history", params={"max_items": 1})).json()) == [ids[2]]
        assert list((await http.get("/history", params={"max_items": 1, "offset": 0})).json()) == [ids[0]]

        job = (await http.get(f"/api/jobs/{ids[1]}")).json()
        assert job["status"] == "completed"
        assert job["outputs_count"] == 1
        assert job["workflow_id"] == "wf-1"
        assert job["preview_output"]["nodeId"] == "2"
        assert job["preview_output"]["mediaType"] == "images"
        assert job["execution_start_time"] <= job["execution_end_time"]
        assert set(job["workflow"]) == {"prompt", "extra_data"}
        listing = (
            await http.get("/api/jobs", params={"status": "completed", "limit": 2, "sort_order": "asc"})
        ).json()
        assert [j["id"] for j in listing["jobs"]] == ids[:2]
        assert listing["pagination"] == {"offset": 0, "limit": 2, "total": 3, "has_more": True}

        assert (await http.post("/history", json={"delete": [ids[0]]})).status_code == 200
        assert (await http.get(f"/history/{ids[0]}")).json() == {}
        assert (await http.get(f"/api/jobs/{ids[0]}")).status_code == 404


async def test_free_memory_resets_the_node_cache_and_unloads_models(emulator: EmulatorServer) -> None:
    async with httpx.AsyncClient(base_url=emulator.url) as http, ws_socket(emulator.url, "f") as ws:

        async def run(graph: dict[str, object]) -> list[str]:
            prompt_id = (await post_prompt(http, graph, client_id="f")).json()["prompt_id"]
            frames = await frames_until_done(ws, prompt_id)
            return next(f for f in frames if f["type"] == "execution_cached")["data"]["nodes"]

        graph = sampler_graph(seed=5, steps=2)
        assert await run(graph) == []
        assert emulator.stats_snapshot()["loaded_models"] == ["checkpoints/flux1-dev-fp8.safetensors"]
        assert len(await run(graph)) == 7
        await http.post("/free", json={"unload_models": True})
        assert emulator.stats_snapshot()["loaded_models"] == []
        assert len(await run(graph)) == 7  # unloading models leaves the node cache alone
        await http.post("/free", json={"free_memory": True})
        assert await run(graph) == []


async def test_uploads_and_view(emulator_factory: EmulatorFactory) -> None:
    def png(color: str, size: tuple[int, int] = (40, 20)) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", size, color).save(buffer, format="PNG")
        return buffer.getvalue()

    async with (
        emulator_factory(max_upload_size=64 * 1024) as emu,
        httpx.AsyncClient(base_url=emu.url) as http,
    ):

        async def upload(data: bytes, **fields: str) -> httpx.Response:
            return await http.post("/upload/image", files={"image": ("probe_upload.png", data)}, data=fields)

        assert (await upload(png("red"))).json() == {
            "name": "probe_upload.png",
            "subfolder": "",
            "type": "input",
        }
        assert (await upload(png("red"))).json()["name"] == "probe_upload.png"  # same bytes: no copy
        assert (await upload(png("blue"))).json()["name"] == "probe_upload (1).png"
        assert (await upload(png("green"), overwrite="true")).json()["name"] == "probe_upload.png"
        assert (await upload(png("red"), subfolder="probe_sub")).json() == {
            "name": "probe_upload.png",
            "subfolder": "probe_sub",
            "type": "input",
        }
        assert (await upload(png("red"), subfolder="../../escape")).status_code == 400
        assert (
            await http.post("/upload/image", data={"type": "input"}, files={"other": ("x", b"x")})
        ).status_code == 400
        assert (await upload(os.urandom(70 * 1024))).status_code == 413

        graph = {
            "1": {"class_type": "LoadImage", "inputs": {"image": "probe_sub/probe_upload.png"}},
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
                "inputs": {"images": ["2", 0], "filename_prefix": "probe/load_scale"},
            },
        }
        prompt_id = (await post_prompt(http, graph)).json()["prompt_id"]
        await eventually(lambda: prompt_id in emu.state.history)
        image = emu.state.history[prompt_id]["outputs"]["3"]["images"][0]
        view = await http.get("/view", params=image)
        assert view.headers["x-content-type-options"] == "nosniff"
        with Image.open(io.BytesIO(view.content)) as scaled:
            assert scaled.size == (200, 100)
            assert scaled.getpixel((100, 50)) == (255, 0, 0)
        webp = await http.get("/view", params={**image, "preview": "webp;50"})
        assert webp.headers["content-type"] == "image/webp"
        annotated = await http.get(
            "/view", params={"filename": "probe_upload.png [input]", "subfolder": "probe_sub"}
        )
        assert annotated.status_code == 200
        assert (await http.get("/view", params={"filename": "nothing.png"})).status_code == 404
        assert (await http.get("/view", params={"filename": "../secret.png"})).status_code == 400
        assert (await http.get("/view", params={"filename": "/etc/passwd"})).status_code == 400
        assert (
            await http.get("/view", params={"filename": "x.png", "subfolder": "../.."})
        ).status_code == 403


async def test_save_image_names_and_pixels_follow_the_graph(emulator: EmulatorServer) -> None:
    async with httpx.AsyncClient(base_url=emulator.url) as http, ws_socket(emulator.url, "p") as ws:

        async def save(graph: dict[str, object]) -> bytes:
            prompt_id = (await post_prompt(http, graph, client_id="p")).json()["prompt_id"]
            frames = await frames_until_done(ws, prompt_id)
            image = next(f for f in frames if f["type"] == "executed")["data"]["output"]["images"][0]
            return (await http.get("/view", params=image)).content

        first = await save(sampler_graph(seed=1, text="a red barn"))
        await http.post("/free", json={"free_memory": True})
        repeat = await save(sampler_graph(seed=1, text="a red barn"))
        other_seed = await save(sampler_graph(seed=2, text="a red barn"))
        other_text = await save(sampler_graph(seed=1, text="a blue barn"))
        assert first == repeat
        pixels = {Image.open(io.BytesIO(data)).tobytes() for data in (first, other_seed, other_text)}
        assert len(pixels) == 3
        names = sorted(os.listdir(emulator.output_dir))
        assert names == [
            "ComfyUI_00001_.png",
            "ComfyUI_00002_.png",
            "ComfyUI_00003_.png",
            "ComfyUI_00004_.png",
        ]
        with Image.open(Path(emulator.output_dir) / names[0]) as png:
            assert json.loads(png.info["prompt"])["3"]["class_type"] == "KSampler"


async def test_other_output_nodes(emulator_factory: EmulatorFactory) -> None:
    async with (
        emulator_factory(previews=True, step_time_s=0.001) as emu,
        httpx.AsyncClient(base_url=emu.url) as http,
    ):
        async with ws_socket(emu.url, "legacy") as legacy, ws_socket(emu.url, "meta") as meta:
            await next_json(legacy)
            await next_json(meta)
            await meta.send(
                json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
            )
            assert (await next_json(meta))["type"] == "feature_flags"
            graph = {
                "1": {
                    "class_type": "EmptyImage",
                    "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 255},
                },
                "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
            }
            for ws, client in ((legacy, "legacy"), (meta, "meta")):
                graph["1"]["inputs"]["color"] += 1  # type: ignore[operator]
                prompt_id = (await post_prompt(http, graph, client_id=client)).json()["prompt_id"]
                frames = await frames_until_done(ws, prompt_id)
                binary = next(f["bytes"] for f in frames if f["type"] == "<binary>")
                if client == "legacy":
                    assert binary[:8] == b"\x00\x00\x00\x01\x00\x00\x00\x02"
                    assert binary[8:12] == b"\x89PNG"
                else:
                    length = int.from_bytes(binary[4:8], "big")
                    assert binary[:4] == b"\x00\x00\x00\x04"
                    assert json.loads(binary[8 : 8 + length])["prompt_id"] == prompt_id
                    assert binary[8 + length : 12 + length] == b"\x89PNG"
                assert emu.state.history[prompt_id]["outputs"] == {}

        extra = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": 65280},
            },
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
            "3": {"class_type": "PrimitiveString", "inputs": {"value": "hello from a model-free workflow"}},
            "4": {
                "class_type": "SaveText",
                "inputs": {"text": ["3", 0], "filename_prefix": "probe/text", "format": "txt"},
            },
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {
                "class_type": "SaveLatent",
                "inputs": {"samples": ["5", 0], "filename_prefix": "probe/latent"},
            },
        }
        prompt_id = (await post_prompt(http, extra)).json()["prompt_id"]
        await eventually(lambda: prompt_id in emu.state.history)
        outputs = emu.state.history[prompt_id]["outputs"]
        assert [i["type"] for i in outputs["2"]["images"]] == ["temp", "temp"]
        assert outputs["4"] == {
            "text": ["hello from a model-free workflow"],
            "files": [{"filename": "text_00001.txt", "subfolder": "probe", "type": "output"}],
        }
        assert outputs["6"]["latents"][0]["filename"] == "latent_00001_.latent"
        text = await http.get("/view", params=outputs["4"]["files"][0])
        assert text.text == "hello from a model-free workflow"


async def test_origin_guard(emulator: EmulatorServer) -> None:
    host = emulator.url.removeprefix("http://")
    async with httpx.AsyncClient(base_url=emulator.url) as http:
        assert (
            await http.post(
                "/prompt", json={"prompt": trivial_graph()}, headers={"Origin": "http://evil.example"}
            )
        ).status_code == 403
        assert (await http.get("/queue", headers={"Sec-Fetch-Site": "cross-site"})).status_code == 403
        assert (await http.get("/queue", headers={"Origin": f"http://{host}"})).status_code == 200


async def test_object_info_describes_the_catalogue(emulator_factory: EmulatorFactory) -> None:
    models = {"checkpoints": ["only.safetensors"], "loras": ["style.safetensors"]}
    async with emulator_factory(models=models) as emu, httpx.AsyncClient(base_url=emu.url) as http:
        info = (await http.get("/object_info")).json()
        required = {"KSampler", "CheckpointLoaderSimple", "EmptyLatentImage", "CLIPTextEncode", "VAEDecode", "SaveImage",
                    "EmptyImage", "LoadImage", "ImageScale", "ImageScaleBy", "ImageInvert", "ImageBlur", "ImageSharpen",
                    "PreviewImage", "SaveImageWebsocket", "LoraLoader", "VAELoader", "CLIPLoader", "UNETLoader"}  # fmt: skip
        assert required <= set(info)
        sampler = info["KSampler"]
        assert list(sampler["input"]["required"]) == [
            "model",
            "seed",
            "steps",
            "cfg",
            "sampler_name",
            "scheduler",
            "positive",
            "negative",
            "latent_image",
            "denoise",
        ]
        assert sampler["input"]["required"]["steps"] == [
            "INT",
            {"default": 20, "min": 1, "max": 10000, "step": 1},
        ]
        assert "euler" in sampler["input"]["required"]["sampler_name"][0]
        assert sampler["output"] == ["LATENT"]
        assert sampler["output_node"] is False
        assert info["SaveImage"]["output_node"] is True
        assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["only.safetensors"]
        assert info["CheckpointLoaderSimple"]["output"] == ["MODEL", "CLIP", "VAE"]
        assert (await http.get("/object_info/ImageBlur")).json()["ImageBlur"][
            "category"
        ] == "image/postprocessing"
        assert (await http.get("/object_info/NoSuchNode")).json() == {}
        assert (await http.get("/models/loras")).json() == ["style.safetensors"]
        assert (await http.get("/models/nothing")).status_code == 404


async def test_model_lru_and_load_time(emulator_factory: EmulatorFactory) -> None:
    async with (
        emulator_factory(model_load_s=0.15, model_cache_size=1) as emu,
        httpx.AsyncClient(base_url=emu.url) as http,
    ):

        async def run(ckpt: str, seed: int) -> float:
            started = time.monotonic()
            prompt_id = (await post_prompt(http, sampler_graph(seed=seed, steps=1, ckpt=ckpt))).json()[
                "prompt_id"
            ]
            await eventually(lambda: prompt_id in emu.state.history)
            return time.monotonic() - started

        assert await run("a.safetensors", 1) >= 0.15
        await run("a.safetensors", 2)  # still loaded: no load time
        assert emu.stats.model_loads == 1
        await run("b.safetensors", 3)
        assert emu.stats_snapshot()["loaded_models"] == ["checkpoints/b.safetensors"]
        await run("a.safetensors", 4)  # evicted by b: loaded again although its loader node is cached
        assert emu.stats.model_loads == 3


async def test_runtime_faults(emulator_factory: EmulatorFactory) -> None:
    async with (
        emulator_factory(seed=7) as emu,
        httpx.AsyncClient(base_url=emu.url) as http,
        ws_socket(emu.url, "e") as ws,
    ):

        async def last_message(graph: dict[str, object]) -> dict[str, object]:
            prompt_id = (await post_prompt(http, graph, client_id="e")).json()["prompt_id"]
            frames = await frames_until_done(ws, prompt_id)
            assert types(frames)[-3:] == ["execution_error", "status", "executing"]
            return frames[-3]["data"]

        escape = await last_message(trivial_graph(1, prefix="../../escape"))
        assert escape["exception_type"] == "Exception"
        assert str(escape["exception_message"]).startswith(
            "**** ERROR: Saving image outside the output folder is not allowed."
        )

        assert (await http.post("/emulator/faults", json={"oom_rate": 1.0})).status_code == 200
        oom = await last_message(sampler_graph(seed=1))
        assert (oom["exception_type"], oom["node_type"]) == ("torch.OutOfMemoryError", "KSampler")
        assert str(oom["exception_message"]).startswith("Allocation on device")
        await http.post("/emulator/faults", json={"oom_rate": 0.0, "failure_rate": 1.0})
        failed = await last_message(trivial_graph(2))
        assert failed["node_id"] == "2"
        assert failed["executed"] == ["1"]
        assert (await http.get("/api/jobs", params={"status": "failed"})).json()["pagination"]["total"] == 3

        rejected = await http.post("/emulator/faults", json={"failure_rate": 2})
        assert rejected.status_code == 400
        assert "failure_rate" in rejected.json()["error"]
        assert (await http.post("/emulator/faults", json={"base_dir": "/"})).status_code == 400


async def test_hanging_node_ignores_interrupts_until_it_returns(emulator_factory: EmulatorFactory) -> None:
    async with (
        emulator_factory(hang_s=0.4, hang_node="ImageInvert") as emu,
        httpx.AsyncClient(base_url=emu.url) as http,
    ):
        graph = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1},
            },
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "hang"}},
        }
        async with ws_socket(emu.url, "h") as ws:
            prompt_id = (await post_prompt(http, graph, client_id="h")).json()["prompt_id"]
            await eventually(lambda: emu.state.last_node_id == "2")
            asked = time.monotonic()
            await http.post("/interrupt", json={"prompt_id": prompt_id})
            frames = await frames_until_done(ws, prompt_id)
            assert time.monotonic() - asked >= 0.3
            interrupted = next(f for f in frames if f["type"] == "execution_interrupted")["data"]
            assert interrupted["node_id"] == "3"
            assert interrupted["executed"] == ["1", "2"]


async def test_restart_loses_queue_and_history(emulator_factory: EmulatorFactory) -> None:
    async with emulator_factory(step_time_s=0.02) as emu, httpx.AsyncClient(base_url=emu.url) as http:
        done = (await post_prompt(http, trivial_graph(1))).json()["prompt_id"]
        await eventually(lambda: done in emu.state.history)
        async with ws_socket(emu.url, "r") as ws:
            await next_json(ws)
            running = (await post_prompt(http, sampler_graph(steps=500), client_id="r")).json()["prompt_id"]
            queued = (await post_prompt(http, trivial_graph(2))).json()["prompt_id"]
            await frames_until(ws, "progress")
            assert (await http.post("/emulator/restart", json={})).json()["restarted"] is True
            with pytest.raises(Exception, match=r"1006|no close frame"):
                await frames_until(ws, "execution_success", within=5)
        for prompt_id in (done, running, queued):
            assert (await http.get(f"/history/{prompt_id}")).json() == {}
            assert (await http.get(f"/api/jobs/{prompt_id}")).status_code == 404
        assert (await http.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
        assert (await post_prompt(http, trivial_graph(3))).json()["number"] == 0  # the counter restarts
        stats = (await http.get("/emulator/stats")).json()
        assert stats["restarts"] == 1
        assert stats["executions"][running] == 1


async def test_restart_with_down_time_and_in_process_crash(emulator_factory: EmulatorFactory) -> None:
    async with emulator_factory(crash_after=1) as emu, httpx.AsyncClient(base_url=emu.url) as http:
        await http.post("/emulator/restart", json={"down_s": 0.2})
        with pytest.raises(httpx.ConnectError):
            await http.get("/system_stats")
        await emu.wait_ready()
        first = (await post_prompt(http, trivial_graph(1))).json()["prompt_id"]
        await eventually(lambda: first in emu.state.history)
        await post_prompt(http, trivial_graph(2))
        await asyncio.wait_for(emu.crashed.wait(), 5)
        with pytest.raises(httpx.ConnectError):
            await http.get("/system_stats")
        await emu.restart()
        assert (await http.get("/system_stats")).status_code == 200
        assert emu.stats.crashes == 1
        assert emu.stats.restarts == 2


async def test_startup_delay_keeps_the_port_closed(tmp_path: Path) -> None:
    started = time.monotonic()
    async with EmulatorServer(EmulatorOptions(startup_delay_s=0.6, base_dir=str(tmp_path))) as emu:
        assert time.monotonic() - started < 0.5  # entering does not wait for the port
        async with httpx.AsyncClient(base_url=emu.url) as http:
            with pytest.raises(httpx.ConnectError):
                await http.get("/system_stats")
            await emu.wait_ready()
            assert time.monotonic() - started >= 0.6
            assert (await http.get("/system_stats")).status_code == 200


def test_cli_rejects_bad_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "comfyfleet", "emulator", "--failure-rate", "3"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "failure_rate must be between 0 and 1" in result.stderr
    assert "Traceback" not in result.stderr


async def test_save_counter_follows_the_folder_like_upstream(emulator: EmulatorServer) -> None:
    async with httpx.AsyncClient(base_url=emulator.url) as http:

        async def save(color: int) -> str:
            prompt_id = (await post_prompt(http, trivial_graph(color, prefix="count/me"))).json()["prompt_id"]
            await eventually(lambda: prompt_id in emulator.state.history)
            name: str = emulator.state.history[prompt_id]["outputs"]["2"]["images"][0]["filename"]
            return name

        assert [await save(c) for c in (1, 2, 3)] == ["me_00001_.png", "me_00002_.png", "me_00003_.png"]
        (
            Path(emulator.output_dir) / "count" / "me_00003_.png"
        ).unlink()  # someone cleans up: the counter follows
        assert await save(4) == "me_00003_.png"
        (Path(emulator.output_dir) / "count" / "me_00041_.png").write_bytes(b"")
        assert await save(5) == "me_00042_.png"


async def test_an_error_inside_a_node_is_an_execution_error_and_the_executor_goes_on(
    emulator: EmulatorServer,
) -> None:
    async with httpx.AsyncClient(base_url=emulator.url) as http, ws_socket(emulator.url, "g") as ws:
        await http.post("/upload/image", files={"image": ("garbage.png", b"not an image at all")})
        graph = {
            "1": {"class_type": "LoadImage", "inputs": {"image": "garbage.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "g"}},
        }
        prompt_id = (await post_prompt(http, graph, client_id="g")).json()["prompt_id"]
        frames = await frames_until_done(ws, prompt_id)
        error = next(f for f in frames if f["type"] == "execution_error")["data"]
        assert (error["node_id"], error["exception_type"]) == ("1", "PIL.UnidentifiedImageError")
        after = (await post_prompt(http, trivial_graph(123), client_id="g")).json()["prompt_id"]
        assert types(await frames_until_done(ws, after))[-3] == "execution_success"


# -- frame for frame (reference A.7, "Live sequence") ----------------------------------------------------------


def _hang_graph(color: int = 1) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "hang"}},
    }


def _labels(frames: list[dict[str, Any]]) -> list[str]:
    """Frame types, with the node of ``executing`` and the state of the node ``progress_state`` changed."""
    labels = []
    for frame in frames:
        data = frame.get("data", {})
        if frame["type"] == "executing":
            labels.append(f"executing:{data['node']}")
        elif frame["type"] == "status":
            labels.append(f"status:{data['status']['exec_info']['queue_remaining']}")
        else:
            labels.append(frame["type"])
    return labels


async def test_a_runtime_error_sends_upstreams_sequence_and_error(emulator: EmulatorServer) -> None:
    async with httpx.AsyncClient(base_url=emulator.url) as http, ws_socket(emulator.url, "err") as ws:
        await next_json(ws)
        graph = trivial_graph(5, prefix="../../escape")
        prompt_id = (await post_prompt(http, graph, client_id="err")).json()["prompt_id"]
        frames = await frames_until_done(ws, prompt_id)
        assert _labels(frames) == [
            "status:1", "status:1", "execution_start", "execution_cached", "progress_state", "executing:1",
            "progress_state", "progress_state", "executing:2", "execution_error", "status:0", "executing:None",
        ]  # fmt: skip
        error = frames[9]["data"]
        assert (error["node_id"], error["node_type"], error["executed"]) == ("2", "SaveImage", ["1"])
        assert error["exception_message"].endswith("\n")  # upstream's "{ex}\n{tips}", without tips here
        assert error["current_outputs"] == ["1", "2"]  # every node of the prompt, as upstream sends it
        inputs = error["current_inputs"]
        assert inputs["filename_prefix"] == ["../../escape"]  # a JSON scalar as it is, not its repr
        assert isinstance(inputs["images"][0], str)  # a linked value as its str
        assert inputs["extra_pnginfo"] == [None]
        assert json.loads(inputs["prompt"][0].replace("'", '"'))["2"]["class_type"] == "SaveImage"


async def test_an_out_of_memory_error_carries_upstreams_tips_and_unloads_the_models(
    emulator_factory: EmulatorFactory,
) -> None:
    async with (
        emulator_factory(oom_rate=1.0, seed=1) as emu,
        httpx.AsyncClient(base_url=emu.url) as http,
        ws_socket(emu.url, "oom") as ws,
    ):
        emu.state.loaded_models["checkpoints/earlier.safetensors"] = None
        prompt_id = (await post_prompt(http, sampler_graph(seed=3), client_id="oom")).json()["prompt_id"]
        frames = await frames_until_done(ws, prompt_id)
        error = next(f for f in frames if f["type"] == "execution_error")["data"]
        assert error["exception_message"].startswith("Allocation on device 0 would exceed allowed memory.")
        assert error["exception_message"].endswith(
            "\nThis error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you "
            "might have accidentally set the batch_size to a large number."
        )
        assert emu.stats_snapshot()["loaded_models"] == []


async def test_an_interrupt_is_noticed_after_the_next_nodes_executing_frame(
    emulator_factory: EmulatorFactory,
) -> None:
    async with (
        emulator_factory(hang_s=0.3, hang_node="ImageInvert") as emu,
        httpx.AsyncClient(base_url=emu.url) as http,
        ws_socket(emu.url, "int") as ws,
    ):
        await next_json(ws)
        prompt_id = (await post_prompt(http, _hang_graph(), client_id="int")).json()["prompt_id"]
        await frames_until(ws, "executing")  # node 1
        await eventually(lambda: emu.state.last_node_id == "2")
        await http.post("/interrupt", json={"prompt_id": prompt_id})
        frames = await frames_until_done(ws, prompt_id)
        assert _labels(frames)[-6:] == [
            "progress_state", "progress_state", "executing:3", "execution_interrupted", "status:0", "executing:None"
        ]  # fmt: skip
        interrupted = frames[-3]["data"]
        assert (interrupted["node_id"], interrupted["executed"]) == ("3", ["1", "2"])


async def test_execution_cached_lists_nodes_in_the_prompts_order(emulator: EmulatorServer) -> None:
    graph = {  # the output node first: execution order is 1, 2; the prompt's order is 2, 1
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "order"}},
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 9}},
    }
    async with httpx.AsyncClient(base_url=emulator.url) as http, ws_socket(emulator.url, "o") as ws:
        await next_json(ws)
        for expected in ([], ["2", "1"]):
            prompt_id = (await post_prompt(http, graph, client_id="o")).json()["prompt_id"]
            frames = await frames_until_done(ws, prompt_id)
            assert next(f for f in frames if f["type"] == "execution_cached")["data"]["nodes"] == expected


async def test_progress_follows_its_progress_state_and_previews_take_the_owners_format(
    emulator_factory: EmulatorFactory,
) -> None:
    async with (
        emulator_factory(previews=True) as emu,
        httpx.AsyncClient(base_url=emu.url) as http,
        ws_socket(emu.url, "legacy") as legacy,
        ws_socket(emu.url, "meta") as meta,
    ):
        await next_json(legacy)
        await next_json(meta)
        await meta.send("not json: this is not the handshake, and does not use up its turn")
        await meta.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        assert (await next_json(meta))["type"] == "feature_flags"
        for ws, client, preview_kind in ((legacy, "legacy", 1), (meta, "meta", 4)):
            graph = sampler_graph(seed=len(client), steps=3)
            prompt_id = (await post_prompt(http, graph, client_id=client)).json()["prompt_id"]
            frames = await frames_until_done(ws, prompt_id)
            sampler = frames[_labels(frames).index("executing:3") + 1 :]
            step = (
                ["progress_state", "progress", "<binary>"]
                if preview_kind == 1
                else ["progress_state", "<binary>", "progress"]
            )
            assert _labels(sampler)[: 3 * 3] == step * 3
            assert all(f["bytes"][:4] == preview_kind.to_bytes(4, "big") for f in sampler[:9] if "bytes" in f)
            finished = sampler[9]["data"]["nodes"]["3"]
            assert (finished["state"], finished["value"], finished["max"]) == ("finished", 3, 3)

        # A prompt without a client: every socket gets the legacy format, whatever it announced.
        graph = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 4},
            },
            "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
        }
        await post_prompt(http, graph)
        frames = await frames_until(meta, "progress")
        binary = await meta.recv()
        assert isinstance(binary, bytes)
        assert binary[:8] == b"\x00\x00\x00\x01\x00\x00\x00\x02"
        assert frames[-2]["type"] == "progress_state"


async def test_queue_changes_send_status_frames_like_upstream(emulator_factory: EmulatorFactory) -> None:
    async with (
        emulator_factory(step_time_s=0.05) as emu,
        httpx.AsyncClient(base_url=emu.url) as http,
        ws_socket(emu.url, "observer") as observer,
    ):
        await next_json(observer)

        async def next_status() -> int:
            while True:
                frame = await next_json(observer)
                if frame["type"] == "status":
                    remaining: int = frame["data"]["status"]["exec_info"]["queue_remaining"]
                    return remaining

        async def statuses_of(action: Callable[[], Awaitable[object]]) -> list[int]:
            """queue_remaining of each status frame ``action`` causes. Frames leave in order, so prompts queued
            afterwards mark the end: as many as it takes for a count no frame of the action can have."""
            ceiling = emu.state.queue_remaining()
            await action()
            markers = 0
            while markers == 0 or emu.state.queue_remaining() <= ceiling:
                await post_prompt(http, trivial_graph(len(emu.state.heap) + 100))
                markers += 1
            marker = emu.state.queue_remaining()
            seen = []
            while (remaining := await next_status()) != marker:
                seen.append(remaining)
            return seen[: len(seen) - (markers - 1)]

        running = (await post_prompt(http, sampler_graph(seed=1, steps=400))).json()["prompt_id"]
        assert [await next_status(), await next_status()] == [1, 1]  # put, then get
        first, second = new_id(), new_id()
        assert await statuses_of(lambda: post_prompt(http, trivial_graph(1), prompt_id=first)) == [2]
        await post_prompt(http, trivial_graph(2), prompt_id=second)
        assert await next_status() == 4
        # One status per prompt deleted, none for an id that matches nothing.
        deletes = {"delete": [first, new_id(), second]}
        assert await statuses_of(lambda: http.post("/queue", json=deletes)) == [3, 2]
        await http.post("/queue", json={"clear": True})
        assert await next_status() == 1
        # The last pending prompt: upstream wipes the queue (one status) and announces the delete (another).
        last = new_id()
        await post_prompt(http, trivial_graph(3), prompt_id=last)
        assert await next_status() == 2
        assert await statuses_of(lambda: http.post("/queue", json={"delete": [last]})) == [1, 1]
        assert await statuses_of(lambda: http.post("/queue", json={"clear": True})) == [1]
        await http.post("/queue", json={"clear": True})
        assert await next_status() == 1
        # Cancelling the running job interrupts it: no status of its own, only the one of its end.
        assert (await http.post(f"/api/jobs/{running}/cancel")).json() == {"cancelled": True}
        assert await next_status() == 0
        assert (await http.get(f"/api/jobs/{running}")).json()["status"] == "cancelled"
