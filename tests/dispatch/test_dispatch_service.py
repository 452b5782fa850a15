"""The dispatcher end to end: a real service over real emulator workers (issue 4's must-shows 1 and 5)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import struct
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from comfyfleet.emulators.comfyui.options import EmulatorOptions
from support import TERMINAL, emulators, eventually, running_fleet, seed_workflow, tiny_workflow


async def test_seed_example_completes_and_its_png_downloads(tmp_path: Path) -> None:
    async with (
        emulators(EmulatorOptions(), EmulatorOptions()) as (one, two),
        running_fleet(tmp_path, workers=[one.url, two.url]) as svc,
    ):
        created = await svc.submit(seed_workflow(), workflow_id="text_to_image_v1", priority=5)
        task = await svc.wait_task(created["id"])
        assert task["status"] == "completed", task
        outputs = task["result"]["outputs"]
        assert [output["node_id"] for output in outputs] == ["9"]
        assert outputs[0]["content_type"] == "image/png"
        response = await svc.http.get(outputs[0]["url"])
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(response.content))
        assert image.size == (512, 512)
        assert len(response.content) == outputs[0]["size"]
        timings = task["result"]["timings"]
        assert 0 <= timings["queued_s"] <= timings["total_s"]
        # Collected, then deleted from the worker's history (in a batch, soon after) so long-lived workers
        # stay small.
        assert sum(server.stats.executions.get(task["prompt_id"], 0) for server in (one, two)) == 1
        await eventually(
            lambda: all(task["prompt_id"] not in server.state.history for server in (one, two)),
            what="the prompt's history entry deleted",
        )


async def test_worker_crash_mid_task_is_retried_elsewhere(tmp_path: Path) -> None:
    crashing = EmulatorOptions(crash_after=0, prompt_time_s=0.2)
    async with (
        emulators(crashing, EmulatorOptions()) as (bad, good),
        running_fleet(tmp_path, workers=[bad.url, good.url]) as svc,
    ):
        # Two tasks on two idle workers: one lands on the worker that dies when it starts a prompt. Their
        # checkpoints differ: with the same one, a second task arriving after the first was placed would
        # rightly queue on the worker that has it loaded, and both would share that worker's fate.
        first = await svc.submit(seed_workflow(seed=1))
        other_checkpoint = seed_workflow(seed=2)
        other_checkpoint["4"]["inputs"]["ckpt_name"] = "sd_xl_base_1.0.safetensors"
        second = await svc.submit(other_checkpoint)
        tasks = [await svc.wait_task(task["id"]) for task in (first, second)]
        assert [task["status"] for task in tasks] == ["completed", "completed"]
        assert bad.stats.crashes == 1
        retried = [task for task in tasks if len(task["attempts"]) > 1]
        assert len(retried) == 1, tasks
        first_try = retried[0]["attempts"][0]
        assert first_try["kind"] in {"prompt_lost", "worker_unreachable", "worker_lost"}
        assert retried[0]["retry_count"] == 1
        assert retried[0]["attempts"][-1]["worker_id"] != first_try["worker_id"]


async def test_node_error_fails_at_once_with_comfyui_message(tmp_path: Path) -> None:
    async with (
        emulators(EmulatorOptions(failure_rate=1.0, seed=1)) as (worker,),
        running_fleet(tmp_path, workers=[worker.url]) as svc,
    ):
        created = await svc.submit(seed_workflow(seed=3), max_retries=3)
        task = await svc.wait_task(created["id"])
        assert task["status"] == "failed"
        assert task["error_kind"] == "node_error"
        assert task["retry_count"] == 0
        assert len(task["attempts"]) == 1
        assert worker.stats.prompts_failed == 1
        assert task["error_details"]["exception_message"] in task["error"]
        assert "traceback" not in task["error_details"]


async def test_out_of_memory_is_retried(tmp_path: Path) -> None:
    async with (
        emulators(EmulatorOptions(oom_rate=1.0, seed=1)) as (worker,),
        running_fleet(tmp_path, workers=[worker.url]) as svc,
    ):
        created = await svc.submit(seed_workflow(seed=4), max_retries=2)
        task = await svc.wait_task(created["id"])
        assert task["status"] == "failed"
        assert task["error_kind"] == "out_of_memory"
        assert task["retry_count"] == 2
        assert len(task["attempts"]) == 3


async def test_workflow_rejected_by_comfyui_fails_with_node_errors(tmp_path: Path) -> None:
    payload = seed_workflow(seed=5)
    payload["3"]["inputs"]["sampler_name"] = "magic"
    async with (
        emulators(EmulatorOptions()) as (worker,),
        running_fleet(tmp_path, workers=[worker.url]) as svc,
    ):
        created = await svc.submit(payload)
        task = await svc.wait_task(created["id"])
        assert task["status"] == "failed"
        assert task["error_kind"] == "workflow_invalid"
        assert task["retry_count"] == 0
        errors = task["error_details"]["node_errors"]["3"]["errors"]
        assert errors[0]["type"] == "value_not_in_list"
        assert "magic" in task["error"]


async def test_unknown_node_type_fails_before_reaching_a_worker(tmp_path: Path) -> None:
    payload = tiny_workflow()
    payload["1"]["class_type"] = "NoSuchNode"
    async with (
        emulators(EmulatorOptions()) as (worker,),
        running_fleet(tmp_path, workers=[worker.url]) as svc,
    ):
        created = await svc.submit(payload)
        task = await svc.wait_task(created["id"])
        assert task["status"] == "failed"
        assert task["error_kind"] == "missing_node_type"
        assert task["error_details"]["missing_node_types"] == ["NoSuchNode"]
        assert worker.stats.prompts_accepted == 0


async def test_timeout_interrupts_then_recycles_a_worker_that_ignores_it(tmp_path: Path) -> None:
    hanging = EmulatorOptions(hang_s=math.inf, hang_node="KSampler")
    async with (
        emulators(hanging) as (worker,),
        running_fleet(tmp_path, workers=[worker.url], dispatch={"interrupt_grace_s": 0.3}) as svc,
    ):
        created = await svc.submit(seed_workflow(seed=6), timeout_s=0.5, max_retries=3)
        task = await svc.wait_task(created["id"], within=15)
        assert task["status"] == "failed"
        assert task["error_kind"] == "timeout"
        assert task["retry_count"] == 0
        # The worker kept running the prompt past the grace period: it is taken out of service (a static
        # pool then probes its URL again as a new worker; a managed pool would start a fresh one). The
        # leader writes that at once; a replica not (yet) leading leaves the request on the worker's record
        # for the leader to carry out, so the record may show it a moment after the task ended.
        worker_id = task["attempts"][0]["worker_id"]
        recycled = await eventually(
            lambda: svc.runtime.store.get_worker(worker_id),
            until=lambda record: record.state in {"failed", "terminated"},
            within=15,
            what=f"worker {worker_id} recycled",
        )
        assert "ignored an interrupt" in (recycled.error or "")


@pytest.mark.slow
async def test_timeout_retried_elsewhere_when_configured(tmp_path: Path) -> None:
    hanging = EmulatorOptions(hang_s=math.inf, hang_node="KSampler")
    async with (
        emulators(hanging, EmulatorOptions()) as (bad, good),
        running_fleet(
            tmp_path,
            workers=[bad.url, good.url],
            dispatch={"interrupt_grace_s": 0.3, "retry_timeouts": True},
        ) as svc,
    ):
        tasks = [await svc.submit(seed_workflow(seed=10 + n), timeout_s=1.0) for n in range(2)]
        done = [await svc.wait_task(task["id"], within=20) for task in tasks]
        assert [task["status"] for task in done] == ["completed", "completed"]
        timed_out = [task for task in done if task["attempts"][0]["kind"] == "timeout"]
        assert len(timed_out) == 1
        assert timed_out[0]["worker_id"] != timed_out[0]["attempts"][0]["worker_id"]


async def test_cancel_pending_task(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=[]) as svc:
        created = await svc.submit(tiny_workflow())
        response = await svc.http.delete(f"/api/v1/tasks/{created['id']}")
        assert response.status_code == 200
        assert response.json()["status"] == "cancelled"


async def test_cancel_task_queued_on_worker_never_runs_it(tmp_path: Path) -> None:
    async with (
        emulators(EmulatorOptions(prompt_time_s=1.0)) as (worker,),
        running_fleet(tmp_path, workers=[worker.url]) as svc,
    ):
        running = await svc.submit(seed_workflow(seed=20))
        queued = await svc.submit(seed_workflow(seed=21))
        task = await svc.wait_task(queued["id"], lambda task: task["phase"] == "queued_on_worker", within=10)
        prompt_id = task["prompt_id"]
        response = await svc.http.delete(f"/api/v1/tasks/{queued['id']}")
        assert response.status_code == 202
        assert response.json()["cancel_requested"] is True
        cancelled = await svc.wait_task(queued["id"])
        assert cancelled["status"] == "cancelled"
        first = await svc.wait_task(running["id"])
        assert first["status"] == "completed"
        assert worker.stats.executions.get(prompt_id, 0) == 0


async def test_cancel_executing_task_interrupts_its_prompt(tmp_path: Path) -> None:
    async with (
        emulators(EmulatorOptions(prompt_time_s=30.0)) as (worker,),
        running_fleet(tmp_path, workers=[worker.url]) as svc,
    ):
        created = await svc.submit(seed_workflow(seed=30))
        await svc.wait_task(created["id"], lambda task: task["phase"] == "executing", within=10)
        started = asyncio.get_running_loop().time()
        response = await svc.http.delete(f"/api/v1/tasks/{created['id']}")
        assert response.status_code == 202
        task = await svc.wait_task(created["id"], within=10)
        assert task["status"] == "cancelled"
        assert asyncio.get_running_loop().time() - started < 5
        assert worker.stats.prompts_interrupted == 1


async def test_progress_is_kept_on_the_task(tmp_path: Path) -> None:
    async with (
        emulators(EmulatorOptions(step_time_s=0.05)) as (worker,),
        running_fleet(tmp_path, workers=[worker.url]) as svc,
    ):
        created = await svc.submit(seed_workflow(seed=40, steps=20))
        task = await svc.wait_task(
            created["id"],
            lambda task: (
                (task.get("progress") or {}).get("class_type") == "KSampler"
                and (task["progress"].get("value") or 0) > 0
            ),
            within=10,
        )
        assert task["progress"]["max"] == 20
        assert (await svc.wait_task(created["id"]))["status"] == "completed"


async def test_submit_with_wait_answers_when_the_task_ended(tmp_path: Path) -> None:
    async with (
        emulators(EmulatorOptions()) as (worker,),
        running_fleet(tmp_path, workers=[worker.url]) as svc,
    ):
        response = await svc.http.post(
            "/api/v1/tasks", params={"wait": 20}, json={"payload": seed_workflow(seed=50)}
        )
        assert response.status_code == 201
        assert response.json()["status"] == "completed"
        assert response.json()["result"]["outputs"][0]["content_type"] == "image/png"
        # With nothing to run it, the wait ends at its limit with the task as it stands.
    async with running_fleet(tmp_path / "idle", workers=[]) as svc:
        response = await svc.http.post(
            "/api/v1/tasks", params={"wait": 0.3}, json={"payload": tiny_workflow()}
        )
        assert response.status_code == 201
        assert response.json()["status"] == "pending"


def _png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_base64_input_is_uploaded_and_referenced_by_load_image(tmp_path: Path) -> None:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "bilinear",
                "width": 40,
                "height": 20,
                "crop": "disabled",
            },
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "scaled"}},
    }
    data = base64.b64encode(_png((8, 8), (255, 0, 0))).decode()
    async with (
        emulators(EmulatorOptions()) as (worker,),
        running_fleet(tmp_path, workers=[worker.url]) as svc,
    ):
        created = await svc.submit(graph, inputs=[{"name": "cat.png", "data": data}])
        assert created["inputs"] == [{"name": "cat.png", "size": len(base64.b64decode(data))}]
        task = await svc.wait_task(created["id"])
        assert task["status"] == "completed", task
        image = Image.open(io.BytesIO((await svc.http.get(task["result"]["outputs"][0]["url"])).content))
        assert image.size == (40, 20)
        # Each task's files live in their own folder on the worker, so tasks sharing a worker never collide.
        uploaded = Path(worker.input_dir) / "comfyfleet" / task["id"] / "cat.png"
        assert uploaded.read_bytes() == base64.b64decode(data)


async def test_bad_inputs_are_refused_at_submission(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=[]) as svc:
        for inputs in (
            [{"name": "../x.png", "data": "aGk="}],
            [{"name": "x.png", "data": "%%%"}],
            [{"name": "x.png", "url": "file:///etc/passwd"}],
        ):
            response = await svc.http.post(
                "/api/v1/tasks", json={"payload": tiny_workflow(), "inputs": inputs}
            )
            assert response.status_code == 422, response.text
            assert response.json()["error"] == "invalid_input"


async def test_task_events_stream_queue_position_status_and_progress(tmp_path: Path) -> None:
    async with (
        emulators(EmulatorOptions(step_time_s=0.02)) as (worker,),
        running_fleet(tmp_path, workers=[worker.url]) as svc,
    ):
        created = await svc.submit(seed_workflow(seed=60, steps=10))
        seen: list[tuple[str, dict[str, object]]] = []
        async with svc.http.stream("GET", f"/api/v1/tasks/{created['id']}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            event_name = None
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event_name = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event_name:
                    seen.append((event_name, json.loads(line.split(":", 1)[1])))
        kinds = [kind for kind, _ in seen]
        assert kinds[0] == "snapshot"
        assert kinds[-1] == "status"
        assert seen[-1][1]["status"] == "completed"
        phases = [data.get("phase") for kind, data in seen if kind == "status"]
        assert "executing" in phases
        steps = [data for kind, data in seen if kind == "progress" and data.get("class_type") == "KSampler"]
        assert steps
        assert steps[-1]["max"] == 10


@pytest.mark.slow
async def test_dispatch_feeds_the_latency_duration_and_failure_metrics(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    async with emulators(EmulatorOptions(), EmulatorOptions(failure_rate=1.0, seed=3)) as (good, bad):
        async with running_fleet(tmp_path, workers=[good.url]) as svc:
            before = samples((await svc.http.get("/metrics")).text)
            task = await svc.wait_task((await svc.submit(seed_workflow(seed=70)))["id"])
            assert task["status"] == "completed"
            after = samples((await svc.http.get("/metrics")).text)
        latency = ("comfyfleet_dispatch_latency_seconds_count", ())
        completed = ("comfyfleet_task_duration_seconds_count", (("status", "completed"),))
        assert after[latency] == before.get(latency, 0) + 1
        assert after[completed] == before.get(completed, 0) + 1
        async with running_fleet(tmp_path / "bad", workers=[bad.url]) as svc:
            task = await svc.wait_task((await svc.submit(seed_workflow(seed=71)))["id"])
            assert task["error_kind"] == "node_error"
            failures = samples((await svc.http.get("/metrics")).text)
        assert failures[("comfyfleet_task_failures_total", (("kind", "node_error"),))] >= 1


@pytest.mark.slow
async def test_task_events_follow_the_queue_position_down(tmp_path: Path) -> None:
    # Prompts outlast the stream's 0.5 s throttle of position reads, so position 1 is always seen.
    async with (
        emulators(EmulatorOptions(prompt_time_s=1.0)) as (worker,),
        running_fleet(tmp_path, workers=[worker.url]) as svc,
    ):
        # One worker holds two prompts (prefetch 1): the third task waits at 1, the fourth at 2.
        tasks = [await svc.submit(seed_workflow(seed=80 + n)) for n in range(4)]
        await svc.wait_task(tasks[1]["id"], lambda task: task["status"] == "running", within=10)
        seen: list[tuple[str, dict[str, object]]] = []
        async with svc.http.stream("GET", f"/api/v1/tasks/{tasks[3]['id']}/events") as response:
            event_name = None
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event_name = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event_name:
                    seen.append((event_name, json.loads(line.split(":", 1)[1])))
        assert seen[0][0] == "snapshot"
        assert seen[0][1]["queue_position"] == 2
        positions = [data["queue_position"] for kind, data in seen if kind == "queue_position"]
        assert positions == [1]
        assert seen[-1][1]["status"] == "completed"


async def test_a_worker_withdrawn_for_a_moment_finishes_its_prompt_once(tmp_path: Path) -> None:
    async with (
        emulators(EmulatorOptions(prompt_time_s=1.0)) as (worker,),
        running_fleet(tmp_path, workers=[worker.url]) as svc,
    ):
        created = await svc.submit(seed_workflow(seed=90))
        running = await svc.wait_task(created["id"], lambda task: task["phase"] == "executing", within=10)
        fleet = svc.runtime.services.fleet
        # A failed request makes the fleet hold the worker back until its next probe passes.
        await fleet.report_unreachable(running["worker_id"], "a request timed out")
        task = await svc.wait_task(created["id"], within=15)
        assert task["status"] == "completed"
        assert len(task["attempts"]) == 1
        assert worker.stats.executions == {task["prompt_id"]: 1}


@pytest.mark.slow
async def test_latest_preview_of_a_running_task(tmp_path: Path) -> None:
    async with (
        emulators(EmulatorOptions(previews=True, step_time_s=0.1)) as (worker,),
        running_fleet(tmp_path, workers=[worker.url]) as svc,
    ):
        created = await svc.submit(seed_workflow(seed=95, steps=30))
        previews: list[dict[str, object]] = []
        async with svc.http.stream("GET", f"/api/v1/tasks/{created['id']}/events") as response:
            event_name = None
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event_name = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event_name == "preview":
                    previews.append(json.loads(line.split(":", 1)[1]))
                    if len(previews) == 2:
                        break
        image = await svc.http.get(f"/api/v1/tasks/{created['id']}/preview")
        assert image.status_code == 200
        assert image.headers["content-type"] == previews[-1]["content_type"]
        assert int(image.headers["x-preview-sequence"]) >= 2
        Image.open(io.BytesIO(image.content)).verify()  # a real image
        assert (await svc.wait_task(created["id"]))["status"] == "completed"
        gone = await svc.http.get(f"/api/v1/tasks/{created['id']}/preview")
        assert gone.status_code == 404
        assert gone.json()["error"] == "no_preview"


async def test_gateway_socket_relays_previews_as_comfyui_binary_frames(tmp_path: Path) -> None:
    from websockets.asyncio.client import connect

    async with (
        emulators(EmulatorOptions(previews=True, step_time_s=0.05)) as (worker,),
        running_fleet(tmp_path, workers=[worker.url]) as svc,
    ):
        socket_url = svc.url.replace("http://", "ws://") + "/ws?clientId=viewer"
        async with connect(socket_url, open_timeout=10) as ws:
            response = await svc.http.post(
                "/prompt", json={"prompt": seed_workflow(seed=96, steps=10), "client_id": "viewer"}
            )
            assert response.status_code == 200
            prompt_id = response.json()["prompt_id"]
            binary: list[bytes] = []
            async with asyncio.timeout(20):
                async for frame in ws:
                    if isinstance(frame, bytes):
                        binary.append(frame)
                    elif json.loads(frame) == {
                        "type": "executing",
                        "data": {"node": None, "prompt_id": prompt_id},
                    }:
                        break
        assert binary
        event_type, image_format = struct.unpack_from(">II", binary[0])
        assert (event_type, image_format) == (1, 1)  # PREVIEW_IMAGE, JPEG
        Image.open(io.BytesIO(binary[0][8:])).verify()


@pytest.mark.slow
async def test_fair_share_lets_a_tenant_pass_another_tenants_backlog(tmp_path: Path) -> None:
    keys = [{"key": "crowd-key", "tenant": "crowd"}, {"key": "lone-key", "tenant": "lone"}]
    worker_options = EmulatorOptions(prompt_time_s=0.3)
    async with (
        emulators(worker_options) as (worker,),
        running_fleet(tmp_path, workers=[worker.url], api_keys=keys, dispatch={"fair_share": True}) as svc,
    ):

        async def submit(key: str, color: int) -> str:
            response = await svc.http.post(
                "/api/v1/tasks",
                json={"payload": tiny_workflow(color)},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert response.status_code == 201, response.text
            task_id: str = response.json()["id"]
            return task_id

        crowd = [await submit("crowd-key", color) for color in range(8)]
        lone = await submit("lone-key", 100)

        async def finished(task_id: str, key: str) -> dict[str, Any]:
            async def read() -> dict[str, Any]:
                answer = await svc.http.get(
                    f"/api/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}
                )
                body: dict[str, Any] = answer.json()
                return body

            done: dict[str, Any] = await eventually(
                read, until=lambda t: t["status"] in TERMINAL, within=30, what=task_id
            )
            return done

        lone_task = await finished(lone, "lone-key")
        crowd_tasks = [await finished(task_id, "crowd-key") for task_id in crowd]
        assert all(task["status"] == "completed" for task in [lone_task, *crowd_tasks])

        # The lone tenant's task went at the next free slot: no crowd task claimed after it arrived started
        # before it (at most one claimed in the same instant), although the crowd still had a backlog.
        def at(task: dict[str, Any], field: str) -> datetime:
            return datetime.fromisoformat(task[field].replace("Z", "+00:00"))

        arrived, started = at(lone_task, "created_at"), at(lone_task, "started_at")
        passed_it = [t for t in crowd_tasks if arrived < at(t, "started_at") < started]
        assert len(passed_it) <= 1, [t["started_at"] for t in crowd_tasks]
        assert sum(at(t, "started_at") > started for t in crowd_tasks) >= 3


async def test_an_output_download_answers_alike_on_the_plain_path_and_through_the_router(
    tmp_path: Path,
) -> None:
    """Output downloads are answered before the router looks for a route when nothing about them needs FastAPI;
    a query string sends the same request through the router. Both answer alike: status, headers in order,
    body (refusals included)."""
    keys = [{"key": "alice-key", "tenant": "alice"}, {"key": "bob-key", "tenant": "bob"}]
    async with running_fleet(tmp_path, workers=1, api_keys=keys) as svc:
        alice, bob = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}
        svc.http.headers.update(alice)
        created = await svc.submit(tiny_workflow(color=9))
        task = await svc.wait_task(created["id"])
        [output] = task["result"]["outputs"]
        base = f"/api/v1/tasks/{task['id']}/outputs"
        cases = [
            (output["url"], alice),
            (output["url"], bob),  # another tenant's task: 404
            (output["url"], {"Authorization": "Bearer wrong"}),  # 401, from the router
            (f"{base}/missing.png", alice),
            (f"/api/v1/tasks/not-a-task/outputs/{output['filename']}", alice),
            (f"{base}/{'x' * 300}.png", alice),  # over the route's limit: 422, from the router
        ]

        def shape(response: Any) -> tuple[int, list[tuple[str, str]], bytes]:
            headers = [(name, value) for name, value in response.headers.multi_items() if name != "date"]
            return response.status_code, headers, response.content

        for url, headers in cases:
            plain = await svc.http.get(url, headers=headers)
            routed = await svc.http.get(url, params={"via": "router"}, headers=headers)
            assert shape(plain) == shape(routed), url
        downloaded = await svc.http.get(output["url"])
        assert downloaded.content.startswith(b"\x89PNG")
        assert len(downloaded.content) == output["size"]
