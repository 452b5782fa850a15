"""Helpers for the usage tests: the seed's workflows and the CLI run in-process. (A uniquely named module:
test folders are not packages.) The server they run against is ``support.running_fleet``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

DATA = Path(__file__).parent / "data"


NO_CLIENT_CONFIG = {"COMFYFLEET_CLIENT_CONFIG": "/nonexistent/comfyfleet-client.yaml"}


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The ``comfyfleet`` command run in this process (in a thread, so the server in this event loop keeps
    going): much faster than a subprocess for the many small checks."""
    from typer.testing import CliRunner

    from comfyfleet.cli import app

    def invoke() -> tuple[int, str, str]:
        result = CliRunner().invoke(
            app,
            list(args),
            env={"COMFYFLEET_URL": None, "COMFYFLEET_API_KEY": None, **NO_CLIENT_CONFIG, **(env or {})},
        )  # type: ignore[dict-item]
        return result.exit_code, result.stdout, result.stderr

    return await asyncio.to_thread(invoke)


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path
