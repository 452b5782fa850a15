"""The README's commands work exactly as written after its run command.

The service is started the way ``./scripts/run`` starts it (``comfyfleet serve --config
examples/quickstart.yaml``: SQLite and a pool of local emulator workers that scales from zero), on a free
port with its store and outputs in a temporary directory. The README's blocks then run unchanged from a
folder that looks like a checkout (``.venv`` and ``examples/``), pointed at that server only through the
environment (``COMFYFLEET_URL``); the Python snippet and the curl example name ``:8080`` themselves, which
is the one thing replaced.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
README_URL = "http://127.0.0.1:8080"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


@pytest.fixture(scope="module")
def quickstart_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("quickstart")
    server = ServeProcess(
        workdir,
        "--config",
        str(ROOT / "examples" / "quickstart.yaml"),
        "--store",
        f"sqlite:///{workdir / 'quickstart.db'}",
        "--outputs",
        str(workdir / "outputs"),
    ).start()
    try:
        yield server.wait_listening()
    finally:
        server.stop()


@pytest.fixture
def checkout_like(tmp_path: Path) -> Path:
    """A folder where the README's relative paths mean what they mean in a checkout."""
    for name in (".venv", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def _run(command: list[str], cwd: Path, server: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("COMFYFLEET_")}
    env.update(COMFYFLEET_URL=server, COMFYFLEET_CLIENT_CONFIG=str(cwd / "no-client-config.yaml"))
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_cli_lines_work_as_written(quickstart_server: str, checkout_like: Path) -> None:
    (cli_block,) = [block for block in _blocks("bash") if "comfyfleet submit" in block]
    result = _run(["bash", "-e", "-c", cli_block], checkout_like, quickstart_server)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout
    assert "completed task" in result.stdout
    assert [path.suffix for path in (checkout_like / "results").iterdir()] == [".png"]


@pytest.mark.slow
def test_the_python_snippet_works_as_written(quickstart_server: str, checkout_like: Path) -> None:
    (snippet,) = [block for block in _blocks("python") if "Client(" in block]
    assert README_URL in snippet
    result = _run(
        [".venv/bin/python", "-c", snippet.replace(README_URL, quickstart_server)],
        checkout_like,
        quickstart_server,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (png,) = (checkout_like / "results").iterdir()
    assert png.read_bytes().startswith(b"\x89PNG")


def test_the_curl_example_is_accepted(quickstart_server: str) -> None:
    (curl,) = [block for block in _blocks("bash") if block.startswith("curl -X POST")]
    host_port = quickstart_server.removeprefix("http://")
    result = subprocess.run(
        [
            "bash",
            "-c",
            curl.strip().replace("localhost:8080", host_port) + " -s -o /dev/null -w '%{http_code}'",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout == "201", result.stderr
    tasks = httpx.get(f"{quickstart_server}/api/v1/tasks").json()["tasks"]
    assert tasks[0]["workflow_id"] == "text_to_image_v1"
