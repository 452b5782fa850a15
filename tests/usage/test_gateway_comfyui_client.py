"""Must-show 1: a client written only for ComfyUI runs unchanged against comfyfleet with two workers.

``comfyui_websocket_client`` below follows ComfyUI's own ``websockets_api_example.py``: blocking urllib
for HTTP, a WebSocket opened with a clientId, ``POST /prompt`` with that client_id and its own prompt_id,
frames read until ``executing`` with ``node: null`` for that prompt, then ``/history/{id}`` and ``/view``.
Nothing in it knows about comfyfleet.
"""

from __future__ import annotations

import asyncio
import io
import json
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from PIL import Image
from websockets.sync.client import connect

from support import Fleet, eventually, running_fleet, seed_workflow, tiny_workflow


def comfyui_websocket_client(
    server_address: str, prompt: dict[str, Any]
) -> tuple[dict[str, list[bytes]], list[dict[str, Any]]]:
    """ComfyUI's websocket API example, as a ComfyUI user would write it. Returns the images by node and
    every JSON frame seen (for the test to check the order)."""
    client_id = str(uuid.uuid4())
    frames: list[dict[str, Any]] = []

    def queue_prompt(prompt: dict[str, Any], prompt_id: str) -> None:
        p = {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id}
        data = json.dumps(p).encode("utf-8")
        req = urllib.request.Request(f"http://{server_address}/prompt", data=data)
        urllib.request.urlopen(req).read()

    def get_image(filename: str, subfolder: str, folder_type: str) -> bytes:
        data = {"filename": filename, "subfolder": subfolder, "type": folder_type}
        url_values = urllib.parse.urlencode(data)
        with urllib.request.urlopen(f"http://{server_address}/view?{url_values}") as response:
            return bytes(response.read())

    def get_history(prompt_id: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{server_address}/history/{prompt_id}") as response:
            return dict(json.loads(response.read()))

    def get_images(ws: Any, prompt: dict[str, Any]) -> dict[str, list[bytes]]:
        prompt_id = str(uuid.uuid4())
        queue_prompt(prompt, prompt_id)
        output_images: dict[str, list[bytes]] = {}
        while True:
            out = ws.recv()
            if isinstance(out, str):
                message = json.loads(out)
                frames.append(message)
                if message["type"] == "executing":
                    data = message["data"]
                    if data["node"] is None and data["prompt_id"] == prompt_id:
                        break  # Execution is done
            else:
                continue  # previews are binary data

        history = get_history(prompt_id)[prompt_id]
        for node_id in history["outputs"]:
            node_output = history["outputs"][node_id]
            images_output = []
            if "images" in node_output:
                for image in node_output["images"]:
                    image_data = get_image(image["filename"], image["subfolder"], image["type"])
                    images_output.append(image_data)
            output_images[node_id] = images_output
        return output_images

    with connect(f"ws://{server_address}/ws?clientId={client_id}", open_timeout=10) as ws:
        images = get_images(ws, prompt)
    return images, frames


def _with_checkpoint(graph: dict[str, Any], name: str = "sd_xl_base_1.0.safetensors") -> dict[str, Any]:
    graph["4"]["inputs"]["ckpt_name"] = name
    return graph


def _running(fleet: Fleet) -> int:
    """How many of the fleet's emulators are executing a prompt right now."""
    return sum(emulator.state.running is not None for emulator in fleet.emulators)


def _frame_types(frames: list[dict[str, Any]]) -> list[str]:
    return [frame["type"] for frame in frames]


async def test_a_comfyui_websocket_client_runs_unchanged_on_two_workers(tmp_path: Path) -> None:
    # Sampler steps slow enough to hold each prompt running until both are placed (see below).
    async with running_fleet(tmp_path, workers=2, emulator={"step_time_s": 1.0}) as fleet:
        # Two clients, each with the seed example (different seeds and checkpoints). The second starts only
        # once the first prompt runs, and both are released only once each runs on a worker of its own: the
        # placement checked below is the dispatcher's choice, not a race with the threads' start-up. (With
        # the same checkpoint the second prompt would rightly queue behind the first, on the worker that
        # has that checkpoint loaded.)
        first = asyncio.create_task(
            asyncio.to_thread(comfyui_websocket_client, fleet.host_port, seed_workflow(seed=1))
        )
        await eventually(lambda: _running(fleet) == 1, what="the first prompt running")
        second = asyncio.create_task(
            asyncio.to_thread(
                comfyui_websocket_client, fleet.host_port, _with_checkpoint(seed_workflow(seed=2))
            )
        )
        await eventually(lambda: _running(fleet) == 2, what="both prompts running")
        for emulator in fleet.emulators:
            emulator.options.update({"step_time_s": 0.01})
        results = await asyncio.gather(first, second)
        for images, frames in results:
            assert list(images) == ["9"]
            [png] = images["9"]
            with Image.open(io.BytesIO(png)) as picture:
                assert picture.format == "PNG"
                assert picture.size == (512, 512)
            types = _frame_types(frames)
            # ComfyUI's order: status first; execution_start, execution_cached, then nodes and steps;
            # executed before execution_success; the final executing{node: null} last.
            assert types[0] == "status"
            assert "sid" in frames[0]["data"]
            start = types.index("execution_start")
            assert types[start + 1] == "execution_cached"
            executing_nodes = [f["data"]["node"] for f in frames if f["type"] == "executing"]
            assert executing_nodes[-1] is None
            assert "3" in executing_nodes  # the KSampler ran, with its steps reported
            steps = [f["data"] for f in frames if f["type"] == "progress"]
            assert steps
            assert steps[-1]["value"] == steps[-1]["max"] == 20
            assert types.index("executed") < types.index("execution_success") < len(types) - 1
            executed = next(f["data"] for f in frames if f["type"] == "executed")
            assert executed["node"] == "9"
            assert executed["output"]["images"][0]["filename"].endswith(".png")
            # progress_state, ComfyUI's snapshot of the nodes: each node is announced running just before its
            # executing frame, the sampler's steps move it, and all are finished before execution_success.
            for index, frame in enumerate(frames):
                if frame["type"] == "executing" and frame["data"]["node"] is not None:
                    before = frames[index - 1]
                    assert before["type"] == "progress_state"
                    assert before["data"]["nodes"][frame["data"]["node"]]["state"] == "running"
            snapshots = [f["data"] for f in frames if f["type"] == "progress_state"]
            sampler = [
                s["nodes"]["3"] for s in snapshots if s["nodes"].get("3", {}).get("state") == "running"
            ]
            assert (sampler[-1]["value"], sampler[-1]["max"]) == (20, 20)
            last = snapshots[-1]
            assert max(i for i, kind in enumerate(types) if kind == "progress_state") < types.index(
                "execution_success"
            )
            assert {node["state"] for node in last["nodes"].values()} == {"finished"}
            assert set(last["nodes"]) == {n for n in executing_nodes if n is not None}
            assert all(node["prompt_id"] == last["prompt_id"] for node in last["nodes"].values())
        # The two prompts ran on the two workers (one each, as both were free).
        executed_on = [len(emulator.stats.executions) for emulator in fleet.emulators]
        assert sorted(executed_on) == [1, 1], executed_on


async def test_a_rejected_graph_gets_comfyuis_400_shape(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=1) as fleet:
        graph = tiny_workflow()
        graph["1"]["inputs"]["width"] = 99999
        response = await fleet.http.post("/prompt", content=json.dumps({"prompt": graph}))
        assert response.status_code == 400
        body = response.json()
        assert body["error"]["type"] == "prompt_outputs_failed_validation"
        [problem] = body["node_errors"]["1"]["errors"]
        assert problem["type"] == "value_bigger_than_max"
        assert body["node_errors"]["1"]["class_type"] == "EmptyImage"

        unknown = await fleet.http.post(
            "/api/prompt", json={"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}
        )
        assert unknown.status_code == 400
        assert unknown.json()["error"]["type"] == "missing_node_type"
        assert (await fleet.http.post("/prompt", json={"client_id": "x"})).json()["error"][
            "type"
        ] == "no_prompt"
        bad_id = await fleet.http.post("/prompt", json={"prompt": tiny_workflow(), "prompt_id": "NOT-A-UUID"})
        assert bad_id.status_code == 400
        assert bad_id.json()["error"]["type"] == "invalid_prompt_id"
        not_json = await fleet.http.post("/prompt", content=b"{nope")
        assert not_json.status_code == 400
        assert not_json.json()["error"]["type"] == "invalid_json"
        # Nothing was queued by any of these.
        assert (await fleet.http.get("/api/v1/tasks")).json()["count"] == 0
