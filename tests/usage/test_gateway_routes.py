"""The rest of the ComfyUI-compatible gateway: uploads that travel with the prompt, /queue, deleting and
interrupting, /history listings, /view, the catalogue routes, the /api aliases and API keys."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from comfyfleet.gateway.service import _ENDED_CACHE_SIZE
from support import Fleet, eventually, running_fleet, tiny_workflow


def _png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


async def _upload(fleet: Fleet, name: str, data: bytes, **form: str) -> dict[str, Any]:
    response = await fleet.http.post("/upload/image", files={"image": (name, data, "image/png")}, data=form)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def _prompt(fleet: Fleet, graph: dict[str, Any], **fields: Any) -> dict[str, Any]:
    response = await fleet.http.post("/prompt", content=json.dumps({"prompt": graph, **fields}))
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.mark.slow
async def test_an_uploaded_image_is_used_by_whichever_worker_runs_the_prompt(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=2) as fleet:
        first = await _upload(fleet, "cat.png", _png(30, 20, (250, 0, 0)), subfolder="pets")
        assert first == {"name": "cat.png", "subfolder": "pets", "type": "input"}
        assert (await _upload(fleet, "cat.png", _png(30, 20, (250, 0, 0)), subfolder="pets"))[
            "name"
        ] == "cat.png"
        other = await _upload(fleet, "cat.png", _png(8, 8, (0, 250, 0)), subfolder="pets")
        assert other["name"] == "cat (1).png"  # same name, other bytes: renamed, as ComfyUI does
        view = await fleet.http.get(
            "/view", params={"filename": "cat (1).png", "subfolder": "pets", "type": "input"}
        )
        assert view.status_code == 200
        assert view.content == _png(8, 8, (0, 250, 0))

        graph = {
            "1": {"class_type": "LoadImage", "inputs": {"image": "pets/cat.png"}},
            "2": {
                "class_type": "ImageScaleBy",
                "inputs": {"image": ["1", 0], "upscale_method": "area", "scale_by": 2.0},
            },
            "3": {
                "class_type": "SaveImage",
                "inputs": {"images": ["2", 0], "filename_prefix": "pets/scaled"},
            },
        }
        queued = await _prompt(fleet, graph, client_id="uploader")
        assert queued["node_errors"] == {}
        task = await fleet.wait_task(queued["prompt_id"])
        assert task["status"] == "completed", task
        history = (await fleet.http.get(f"/history/{queued['prompt_id']}")).json()[queued["prompt_id"]]
        [image] = history["outputs"]["3"]["images"]
        assert image["subfolder"] == queued["prompt_id"]
        picture = await fleet.http.get("/api/view", params=image)
        with Image.open(io.BytesIO(picture.content)) as result:
            assert result.size == (60, 40)
        # Not uploaded and on no worker: refused at once, as ComfyUI would.
        graph["1"]["inputs"]["image"] = "pets/dog.png"
        refused = await fleet.http.post("/prompt", json={"prompt": graph})
        assert refused.status_code == 400
        assert refused.json()["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"
        bad = await fleet.http.post("/upload/image", data={"subfolder": "x"})
        assert bad.status_code == 400


def _mask(width: int, height: int) -> bytes:
    """Transparent left half, opaque right half (ComfyUI's mask editor paints the alpha channel)."""
    image = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def _masked(fleet: Fleet, original_ref: object, name: str = "clipspace-mask.png") -> Any:
    return await fleet.http.post(
        "/upload/mask",
        files={"image": (name, _mask(30, 20), "image/png")},
        data={"original_ref": json.dumps(original_ref), "subfolder": "clipspace", "type": "input"},
    )


async def test_a_mask_upload_puts_its_alpha_into_the_original_image(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=1) as fleet:
        await _upload(fleet, "cat.png", _png(30, 20, (250, 0, 0)), subfolder="pets")
        answer = await _masked(fleet, {"filename": "cat.png", "subfolder": "pets", "type": "input"})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"name": "clipspace-mask.png", "subfolder": "clipspace", "type": "input"}
        view = await fleet.http.get(
            "/view", params={"filename": "clipspace-mask.png", "subfolder": "clipspace", "type": "input"}
        )
        with Image.open(io.BytesIO(view.content)) as combined:
            assert (combined.format, combined.mode, combined.size) == ("PNG", "RGBA", (30, 20))
            assert combined.getpixel((5, 10)) == (250, 0, 0, 0)  # the original's colour, the mask's alpha
            assert combined.getpixel((25, 10)) == (250, 0, 0, 255)

        # A prompt reads the masked upload like any other (LoadImage gives its alpha as the MASK).
        graph = {
            "1": {"class_type": "LoadImage", "inputs": {"image": "clipspace/clipspace-mask.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "masked"}},
        }
        task = await fleet.wait_task((await _prompt(fleet, graph))["prompt_id"])
        assert task["status"] == "completed", task

        # The original may be a task's output (subfolder = the task id, as /view names it).
        [output] = task["result"]["outputs"]
        answer = await _masked(
            fleet, {"filename": output["filename"], "subfolder": task["id"], "type": "output"}, "out-mask.png"
        )
        assert answer.status_code == 200, answer.text

        assert (
            await _masked(fleet, {"filename": "dog.png", "subfolder": "pets", "type": "input"})
        ).status_code == 404
        assert (
            await _masked(fleet, {"filename": "x.png", "subfolder": str(uuid.uuid4()), "type": "output"})
        ).status_code == 404
        assert (await _masked(fleet, "not an object")).status_code == 400
        garbage = await fleet.http.post(
            "/upload/mask",
            files={"image": ("m.png", b"not an image", "image/png")},
            data={"original_ref": json.dumps({"filename": "cat.png", "subfolder": "pets", "type": "input"})},
        )
        assert (garbage.status_code, garbage.text.startswith("cannot combine the mask")) == (400, True)
        refused = await fleet.http.post("/upload/mask", files={"image": ("m.png", _mask(4, 4), "image/png")})
        assert refused.status_code == 400
        assert "original_ref" in refused.text


@pytest.mark.slow
async def test_queue_delete_interrupt_and_history(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=1, emulator={"prompt_time_s": 3}) as fleet:
        ids = [(await _prompt(fleet, tiny_workflow(color=c), client_id="q"))["prompt_id"] for c in (1, 2, 3)]
        assert (await fleet.http.get("/prompt")).json() == {"exec_info": {"queue_remaining": 3}}

        async def one_waits() -> dict[str, Any] | None:
            queue = (await fleet.http.get("/queue")).json()
            return queue if len(queue["queue_running"]) == 2 and len(queue["queue_pending"]) == 1 else None

        queue = await eventually(one_waits, within=10)
        number, prompt_id, prompt, extra, outputs = queue["queue_pending"][0]
        assert prompt_id == ids[2]
        assert prompt == tiny_workflow(color=3)
        assert extra["client_id"] == "q"
        assert outputs == ["2"]
        assert isinstance(number, int)

        # Delete acts on pending prompts only; interrupt stops a running one.
        assert (await fleet.http.post("/queue", json={"delete": [ids[2], ids[0]]})).status_code == 200
        assert (await fleet.http.get(f"/api/v1/tasks/{ids[2]}")).json()["status"] == "cancelled"
        assert (await fleet.http.get(f"/api/v1/tasks/{ids[0]}")).json()["status"] == "running"
        assert (await fleet.http.post("/api/interrupt", json={"prompt_id": ids[0]})).status_code == 200
        assert (await fleet.wait_task(ids[0]))["status"] == "cancelled"
        assert (await fleet.wait_task(ids[1]))["status"] == "completed"

        assert (
            await fleet.http.get(f"/history/{ids[2]}")
        ).json() == {}  # deleted before it ran: not in history
        interrupted = (await fleet.http.get(f"/history/{ids[0]}")).json()[ids[0]]
        assert interrupted["status"]["status_str"] == "error"
        assert interrupted["status"]["completed"] is False
        assert interrupted["status"]["messages"][-1][0] == "execution_interrupted"
        everything = (await fleet.http.get("/history")).json()
        assert list(everything) == [ids[0], ids[1]]  # oldest first
        assert list((await fleet.http.get("/history", params={"max_items": 1})).json()) == [ids[1]]
        assert list((await fleet.http.get("/history", params={"max_items": 1, "offset": 0})).json()) == [
            ids[0]
        ]
        assert (await fleet.http.get("/history", params={"max_items": "x"})).status_code == 400
        assert (await fleet.http.get(f"/history/{uuid.uuid4()}")).json() == {}
        assert (await fleet.http.get("/history/not-a-uuid")).json() == {}
        assert (await fleet.http.post("/history", json={"clear": True})).status_code == 200
        assert len((await fleet.http.get("/history")).json()) == 2  # comfyfleet keeps its records


async def test_catalogue_routes_view_errors_and_a_client_chosen_prompt_id(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=2) as fleet:
        info = (await fleet.http.get("/object_info")).json()
        assert info["KSampler"]["output_node"] is False
        assert info["SaveImage"]["output_node"] is True
        assert list((await fleet.http.get("/api/object_info/KSampler")).json()) == ["KSampler"]
        assert (await fleet.http.get("/object_info/NoSuchNode")).json() == {}
        stats = (await fleet.http.get("/system_stats")).json()
        assert stats["system"]["workers"] == 2
        assert len(stats["devices"]) >= 2
        assert (await fleet.http.get("/features")).json()["supports_preview_metadata"] is False

        chosen = str(uuid.uuid4())
        queued = await _prompt(fleet, tiny_workflow(), prompt_id=chosen)
        assert queued["prompt_id"] == chosen  # the client's id is the task's id
        again = await _prompt(fleet, tiny_workflow(), prompt_id=chosen)  # a retried POST queues nothing new
        assert again["number"] == queued["number"]
        assert (await fleet.wait_task(chosen))["status"] == "completed"
        assert (await fleet.http.get("/api/v1/tasks")).json()["count"] == 1

        for params, status in (
            ({"filename": "../etc/passwd"}, 400),
            ({"filename": "x.png", "subfolder": "/abs"}, 400),
            ({"filename": "x.png", "subfolder": chosen}, 404),
            ({"filename": "x.png", "subfolder": "not-a-task"}, 404),
        ):
            assert (await fleet.http.get("/view", params=params)).status_code == status, params
        # partial_execution_targets: only what the chosen output needs is run.
        graph = {
            **tiny_workflow(),
            "3": {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1},
            },
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "other"}},
        }
        partial = await _prompt(fleet, graph, partial_execution_targets=["4"])
        task = await fleet.wait_task(partial["prompt_id"])
        assert sorted(task["payload"]) == ["3", "4"]
        assert [output["node_id"] for output in task["result"]["outputs"]] == ["4"]


async def test_another_clients_prompt_shows_on_a_socket_only_as_the_queue_length(tmp_path: Path) -> None:
    """ComfyUI's routing: ``status`` frames (the queue length) reach every socket, a prompt's own frames only
    its client's. The bystander hears the queue's length (at most every 0.1 s; the prompt takes longer) and
    nothing else of the prompt."""
    async with running_fleet(tmp_path, workers=1, emulator={"prompt_time_s": 0.5}) as fleet:
        ws_url = fleet.url.replace("http://", "ws://") + "/ws?clientId="
        async with connect(ws_url + "owner") as owner, connect(ws_url + "bystander") as bystander:
            for socket in (owner, bystander):
                assert json.loads(await asyncio.wait_for(socket.recv(), 5))["type"] == "status"
            await _prompt(fleet, tiny_workflow(color=3), client_id="owner")
            owned = []
            while not owned or owned[-1] != {"type": "executing", "node": None}:
                frame = json.loads(await asyncio.wait_for(owner.recv(), 10))
                owned.append({"type": frame["type"], "node": frame["data"].get("node")})
            assert {"execution_start", "executed", "execution_success"} <= {f["type"] for f in owned}

            def remaining(frame: dict[str, Any]) -> Any:
                return frame["data"].get("status", {}).get("exec_info", {}).get("queue_remaining")

            # The bystander's frames, up to the one that says the queue is empty again (the prompt's end is
            # the last event it hears, so any frame of the prompt itself would come before).
            frames = [json.loads(await asyncio.wait_for(bystander.recv(), 10))]
            while remaining(frames[-1]) != 0:
                frames.append(json.loads(await asyncio.wait_for(bystander.recv(), 10)))
            assert {frame["type"] for frame in frames} == {"status"}
            assert [remaining(frame) for frame in frames] in (
                [1, 0],
                [0],
            )  # one may have waited for the other


async def test_a_history_entry_reads_the_same_right_after_the_end_and_from_the_store(tmp_path: Path) -> None:
    """The gateway keeps the last few tasks its replica ended for the history read every client makes at the
    end; once others pushed it out, the entry comes from the store, the same; another tenant never sees it."""
    keys = [{"key": "alice-key", "tenant": "alice"}, {"key": "bob-key", "tenant": "bob"}]
    async with running_fleet(tmp_path, workers=1, api_keys=keys) as fleet:
        alice, bob = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}

        async def queue(color: int) -> str:
            body = {"prompt": tiny_workflow(color=color)}
            return str((await fleet.http.post("/prompt", headers=alice, json=body)).json()["prompt_id"])

        async def entry(prompt_id: str) -> dict[str, Any]:
            return dict((await fleet.http.get(f"/history/{prompt_id}", headers=alice)).json())

        first = await queue(0)
        fresh = await eventually(lambda: entry(first), what="the prompt in history")
        assert fresh[first]["status"]["status_str"] == "success"
        assert (await fleet.http.get(f"/history/{first}", headers=bob)).json() == {}
        later = [await queue(color) for color in range(1, _ENDED_CACHE_SIZE + 2)]
        await eventually(lambda: entry(later[-1]), what="the last prompt in history")
        assert await entry(first) == fresh
        assert (await fleet.http.get(f"/history/{first}", headers=bob)).json() == {}


async def test_api_keys_guard_the_gateway_and_its_socket(tmp_path: Path) -> None:
    async with running_fleet(
        tmp_path,
        workers=1,
        api_keys=[{"key": "alice-key", "tenant": "alice"}, {"key": "bob-key", "tenant": "bob"}],
    ) as fleet:
        assert (await fleet.http.post("/prompt", json={"prompt": tiny_workflow()})).status_code == 401
        ws_url = fleet.url.replace("http://", "ws://") + "/ws?clientId=a"
        with pytest.raises(InvalidStatus) as refused:  # closed before the handshake completes: HTTP 403
            async with connect(ws_url):
                pass
        assert refused.value.response.status_code == 403
        async with connect(ws_url + "&token=alice-key") as socket:
            hello = json.loads(await asyncio.wait_for(socket.recv(), 5))
            assert hello == {
                "type": "status",
                "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "a"},
            }
            response = await fleet.http.post(
                "/prompt", params={"token": "alice-key"}, json={"prompt": tiny_workflow(), "client_id": "a"}
            )
            prompt_id = response.json()["prompt_id"]
            frames = []
            while True:
                frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
                frames.append(frame["type"])
                if frame["type"] == "executing" and frame["data"]["node"] is None:
                    break
            assert frames[-3:] == ["execution_success", "status", "executing"]
        # Bob sees nothing of Alice's prompt.
        bob = {"Authorization": "Bearer bob-key"}
        assert (await fleet.http.get(f"/history/{prompt_id}", headers=bob)).json() == {}
        assert (
            await fleet.http.get(f"/history/{prompt_id}", headers={"Authorization": "Bearer alice-key"})
        ).json()
        assert (await fleet.http.get("/queue", headers=bob)).json() == {
            "queue_running": [],
            "queue_pending": [],
        }


async def test_history_and_view_answer_alike_on_the_plain_path_and_through_the_router(tmp_path: Path) -> None:
    """``/history/{id}`` and ``/view`` (and their ``/api`` aliases) are answered before the router looks for a
    route when nothing about them needs FastAPI; an extra query parameter sends the same request through the
    router. Both answer alike: status, headers in order, body."""
    keys = [{"key": "alice-key", "tenant": "alice"}, {"key": "bob-key", "tenant": "bob"}]
    async with running_fleet(tmp_path, workers=1, api_keys=keys) as fleet:
        alice, bob = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}
        queued = await fleet.http.post("/prompt", headers=alice, json={"prompt": tiny_workflow(color=5)})
        prompt_id = queued.json()["prompt_id"]

        async def entry() -> dict[str, Any]:
            return dict((await fleet.http.get(f"/history/{prompt_id}", headers=alice)).json())

        history = await eventually(entry, what="the prompt in history")
        (image,) = history[prompt_id]["outputs"]["2"]["images"]
        view = {"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]}
        cases: list[tuple[str, dict[str, str], dict[str, str]]] = [
            (f"/history/{prompt_id}", {}, alice),
            (f"/api/history/{prompt_id}", {}, alice),
            (f"/history/{prompt_id}", {}, bob),  # another tenant's: {}
            (f"/history/{uuid.uuid4()}", {}, alice),
            (f"/history/{prompt_id}", {}, {}),  # no key: 401 in ComfyUI's shape, from the router
            ("/view", view, alice),
            ("/api/view", view, alice),
            ("/view", {"filename": image["filename"], "subfolder": image["subfolder"]}, alice),
            ("/view", view, bob),
            ("/view", {**view, "filename": "missing.png"}, alice),
            ("/view", {"filename": "../x.png"}, alice),
        ]

        def shape(response: Any) -> tuple[int, list[tuple[str, str]], bytes]:
            headers = [(name, value) for name, value in response.headers.multi_items() if name != "date"]
            return response.status_code, headers, response.content

        for path, params, headers in cases:
            plain = await fleet.http.get(path, params=params, headers=headers)
            routed = await fleet.http.get(path, params={**params, "via": "router"}, headers=headers)
            assert shape(plain) == shape(routed), (path, params)
        assert (await fleet.http.get("/view", params=view, headers=alice)).content.startswith(b"\x89PNG")


async def test_prompts_answer_alike_on_the_plain_path_and_through_the_router(tmp_path: Path) -> None:
    """``POST /prompt`` (and ``/api/prompt``) is answered before the router when the caller's key is in its
    headers and there is no query; a query parameter sends the same request through the router. Both answer
    alike (status, headers in order, body) whatever the body, and both queue the prompt."""
    keys = [{"key": "alice-key", "tenant": "alice"}]
    async with running_fleet(tmp_path, workers=1, api_keys=keys) as fleet:
        alice = {"Authorization": "Bearer alice-key"}
        bad_graph = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
        cases: list[tuple[str, bytes, dict[str, str]]] = [
            ("/prompt", b"", alice),  # no body: ComfyUI's 400
            ("/prompt", b"{not json", alice),
            ("/prompt", b"[1, 2]", alice),
            ("/prompt", b'{"client_id": "x"}', alice),  # no prompt
            ("/api/prompt", json.dumps({"prompt": bad_graph}).encode(), alice),
            ("/prompt", b"[" * 100_000, alice),  # nested too deeply to read
            (
                "/prompt",
                json.dumps({"prompt": tiny_workflow(color=9)}).encode(),
                {},
            ),  # no key: the router's 401
        ]

        def shape(response: Any) -> tuple[int, list[tuple[str, str]], bytes]:
            headers = [(name, value) for name, value in response.headers.multi_items() if name != "date"]
            return response.status_code, headers, response.content

        for path, body, headers in cases:
            plain = await fleet.http.post(path, content=body, headers=headers)
            routed = await fleet.http.post(path, params={"via": "router"}, content=body, headers=headers)
            assert plain.status_code in (400, 401), (path, body[:40], plain.text)
            assert shape(plain) == shape(routed), (path, body[:40])

        queued = []
        for path, params in [("/prompt", {}), ("/api/prompt", {}), ("/prompt", {"via": "router"})]:
            body = json.dumps({"prompt": tiny_workflow(color=len(queued)), "client_id": "c1"})
            response = await fleet.http.post(
                path, params=params, content=body, headers={**alice, "Content-Type": "text/plain"}
            )
            status, header_list, _ = shape(response)
            assert status == 200
            assert [name for name, _ in header_list] == ["content-length", "content-type"]
            answer = response.json()
            assert sorted(answer) == ["node_errors", "number", "prompt_id"]
            assert answer["node_errors"] == {}
            queued.append(answer["prompt_id"])

        async def finished() -> dict[str, Any]:
            entries: dict[str, Any] = {}
            for prompt_id in queued:
                entries.update((await fleet.http.get(f"/history/{prompt_id}", headers=alice)).json())
            return entries

        history = await eventually(
            finished, until=lambda entries: len(entries) == len(queued), what="every queued prompt in history"
        )
        assert all(entry["status"]["status_str"] == "success" for entry in history.values())
