"""Must-show 2, through the real ``comfyfleet`` command (a subprocess) against a running comfyfleet:
``submit --wait`` of the seed example shows progress and writes the PNG; an invalid workflow prints the
node error and exits non-zero; a UI-format file gets the explanation; clear exits for the rest."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image
from usage_helpers import DATA, NO_CLIENT_CONFIG, cli, write

from support import Fleet, eventually, running_fleet, seed_workflow, tiny_workflow

EXIT_TASK_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_REJECTED = 1, 2, 3, 4


async def comfyfleet(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The real command in a subprocess: what a user runs, with its own terminal-less output."""
    environment = {**os.environ, **NO_CLIENT_CONFIG, **(env or {})}
    for name in ("COMFYFLEET_URL", "COMFYFLEET_API_KEY"):
        if name not in (env or {}):
            environment.pop(name, None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "comfyfleet",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_submit_wait_shows_progress_and_writes_the_png(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=2, emulator={"step_time_s": 0.01}) as fleet:
        workflow = write(tmp_path / "seed.json", seed_workflow())
        code, out, err = await comfyfleet(
            "submit", str(workflow), "--wait", "--out", str(tmp_path / "out"), "--server", fleet.url
        )
        assert code == 0, err
        assert "submitted task" in err
        assert "node 3 (KSampler): step 20/20" in out  # sampler steps, then…
        assert "executing node 9 (SaveImage)" in out  # …the nodes after it
        assert "completed task" in out
        [png] = (tmp_path / "out").glob("*.png")
        assert f"saved {png}" in out
        with Image.open(io.BytesIO(png.read_bytes())) as image:
            assert image.size == (512, 512)

        # Without --wait the id alone is printed (for scripts), and the task can be followed by id.
        code, out, err = await comfyfleet("submit", str(workflow), "--priority", "5", "--server", fleet.url)
        assert code == 0, err
        task_id = out.strip()
        code, out, _ = await comfyfleet("tasks", "show", task_id, "--json", "--server", fleet.url)
        assert code == 0
        assert json.loads(out)["priority"] == 5


async def test_invalid_workflows_print_the_node_errors_and_exit_non_zero(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=1) as fleet:
        # Refused by a worker (ComfyUI's own validation): the task fails, the node error is shown.
        rejected = seed_workflow(sampler_name="no_such_sampler")
        code, _, err = await cli(
            "submit", str(write(tmp_path / "bad.json", rejected)), "--wait", "--server", fleet.url
        )
        assert code == EXIT_TASK_FAILED
        assert "workflow_invalid" in err
        assert "node 3 (KSampler): Value not in list" in err
        assert "no_such_sampler" in err

        # Refused at submission (the graph is malformed): the API names the node and input.
        broken = tiny_workflow()
        broken["2"]["inputs"]["images"] = ["99", 0]
        code, _, err = await cli(
            "submit", str(write(tmp_path / "broken.json", broken)), "--server", fleet.url
        )
        assert code == EXIT_REJECTED
        assert "rejected the workflow" in err
        assert "node 2 input 'images'" in err
        assert "99" in err


async def test_a_ui_format_file_gets_the_explanation(tmp_path: Path) -> None:
    code, out, err = await comfyfleet(
        "submit", str(DATA / "ui_format_workflow.json"), "--server", "http://127.0.0.1:9"
    )
    assert code == EXIT_USAGE
    assert out == ""
    assert "UI format" in err
    assert "Workflow → Export (API)" in err
    assert "Save (API Format)" in err


async def test_missing_files_and_an_unreachable_server_have_clear_exits(tmp_path: Path) -> None:
    code, _, err = await cli("submit", str(tmp_path / "nope.json"))
    assert code == EXIT_USAGE
    assert "does not exist" in err
    workflow = write(tmp_path / "tiny.json", tiny_workflow())
    code, _, err = await cli("submit", str(workflow), "--input", "cat.png=" + str(tmp_path / "cat.png"))
    assert code == EXIT_USAGE
    assert "cat.png" in err
    assert "does not exist" in err
    code, _, err = await cli("submit", str(write(tmp_path / "list.json", [1, 2])))
    assert code == EXIT_USAGE
    assert "not an API-format" in err
    code, _, err = await cli("submit", str(workflow), "--server", "http://127.0.0.1:9")
    assert code == EXIT_UNREACHABLE
    assert "cannot reach the comfyfleet server at http://127.0.0.1:9" in err
    assert "Traceback" not in err


@pytest.mark.slow
async def test_tasks_queue_commands_and_the_config_file(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=1, emulator={"prompt_time_s": 5}) as fleet:
        config = tmp_path / "client.yaml"
        config.write_text(f"url: {fleet.url}\n")
        env = {"COMFYFLEET_CLIENT_CONFIG": str(config)}  # no --server: the URL comes from the config file
        ids = []
        for color in (1, 2, 3, 4):
            code, out, err = await cli(
                "submit", str(write(tmp_path / f"t{color}.json", tiny_workflow(color=color))), env=env
            )
            assert code == 0, err
            ids.append(out.strip())
        code, out, _ = await cli("tasks", "list", env=env)
        assert code == 0
        for task_id in ids:
            assert task_id in out
        running = await _with_status(fleet, "running")
        pending = await _with_status(fleet, "pending")
        code, out, _ = await cli("tasks", "cancel", pending, env=env)
        assert code == 0
        assert f"cancelled task {pending}" in out
        code, out, _ = await cli("tasks", "cancel", running, env=env)  # running: stopped on its worker
        assert code == 0
        assert "cancel requested" in out
        code, _, err = await cli("tasks", "cancel", pending, env=env)
        assert code == EXIT_REJECTED
        assert "already cancelled" in err
        code, _, err = await cli("tasks", "show", "00000000-0000-4000-8000-000000000000", env=env)
        assert code == EXIT_REJECTED
        assert "not found" in err
        code, out, _ = await cli("queue", "--json", env=env)
        assert code == 0
        assert json.loads(out)["cancelled_tasks"] >= 1
        code, out, _ = await cli("tasks", "show", running, env=env)
        assert code == 0
        assert running in out

        code, out, _ = await cli("workers", "list", env=env)
        assert code == 0
        [worker] = fleet.runtime.services.fleet.usable_workers()
        assert worker.id in out
        assert "default" in out
        code, out, _ = await cli("workers", "drain", worker.id, env=env)
        assert code == 0
        assert f"draining worker {worker.id}" in out
        code, _, err = await cli("workers", "drain", "no-such-worker", env=env)
        assert code == EXIT_REJECTED
        assert "no-such-worker" in err
        code, out, _ = await cli("workers", "undrain", worker.id, env=env)
        assert code == 0, out
        assert f"undrained worker {worker.id} (state " in out
        assert fleet.runtime.services.fleet.workers()[0].state.value in ("idle", "busy")
        code, _, err = await cli("workers", "undrain", "no-such-worker", env=env)
        assert code == EXIT_REJECTED
        assert "no-such-worker" in err


async def _with_status(fleet: Fleet, status: str) -> str:
    async def find() -> str | None:
        tasks = (await fleet.http.get("/api/v1/tasks", params={"status": status})).json()["tasks"]
        return str(tasks[0]["id"]) if tasks else None

    return await eventually(find, within=10)


async def test_submit_with_an_input_file(tmp_path: Path) -> None:
    picture = tmp_path / "cat.png"
    Image.new("RGB", (40, 30), (200, 100, 50)).save(picture)
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "bilinear",
                "width": 80,
                "height": 60,
                "crop": "disabled",
            },
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "scaled"}},
    }
    async with running_fleet(tmp_path, workers=1) as fleet:
        code, _, err = await cli(
            "submit",
            str(write(tmp_path / "load.json", graph)),
            "--input",
            f"cat.png={picture}",
            "--out",
            str(tmp_path / "out"),
            "--server",
            fleet.url,
        )
        assert code == 0, err
        [png] = (tmp_path / "out").glob("*.png")
        with Image.open(png) as image:
            assert image.size == (80, 60)


@pytest.mark.slow
async def test_lists_fit_an_80_column_terminal(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=1) as fleet:
        for color in range(3):
            response = await fleet.http.post(
                "/api/v1/tasks",
                json={"payload": tiny_workflow(color=color), "workflow_id": "a-long-workflow-name" * 3},
            )
            assert response.status_code == 201
        for command in (("tasks", "list"), ("workers", "list")):
            code, out, err = await comfyfleet(*command, "--server", fleet.url, env={"COLUMNS": "80"})
            assert code == 0, err
            lines = out.splitlines()
            assert all(len(line) <= 80 for line in lines), out
            assert len(lines) == 1 + (3 if command[0] == "tasks" else 1), out  # one line per row
        task_ids = [task["id"] for task in (await fleet.http.get("/api/v1/tasks")).json()["tasks"]]
        code, out, _ = await comfyfleet("tasks", "list", "--server", fleet.url, env={"COLUMNS": "80"})
        assert all(task_id in out for task_id in task_ids)  # ids stay whole, to be copied


async def test_a_401_names_the_option_and_the_variable(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=0, api_keys=[{"key": "k-123", "tenant": "acme"}]) as fleet:
        code, _, err = await cli("tasks", "list", "--server", fleet.url)
        assert code == EXIT_REJECTED
        assert "--api-key" in err
        assert "COMFYFLEET_API_KEY" in err
        code, _, err = await cli("tasks", "list", "--server", fleet.url, "--api-key", "k-123")
        assert code == 0, err
