"""Helpers shared by the API tests (a uniquely named module: test folders are not packages)."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from pathlib import Path
from typing import Any

import httpx

from comfyfleet.config import ApiKey, Settings
from comfyfleet.runtime import Runtime

SEED_BODY: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "seed_task.json").read_text())
SEED_TASK_FIELDS = (
    "id",
    "workflow_id",
    "priority",
    "status",
    "payload",
    "worker_id",
    "created_at",
    "started_at",
    "completed_at",
    "result",
    "error",
    "retry_count",
    "max_retries",
)

# Keys of the tenants used by the auth tests: alice and bob are tenants, ops is an admin.
KEYS = {"alice": "alice-secret-key", "bob": "bob-secret-key", "ops": "ops-admin-key"}
API_KEYS = [
    ApiKey(key=KEYS["alice"], tenant="alice"),
    ApiKey(key=KEYS["bob"], tenant="bob"),
    ApiKey(key=KEYS["ops"], tenant="ops", admin=True),
]


def seed_body() -> dict[str, Any]:
    """A fresh copy of the seed's curl example body (tests may change it)."""
    return copy.deepcopy(SEED_BODY)


def small_body(**fields: Any) -> dict[str, Any]:
    return {"payload": {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64}}}, **fields}


def bearer(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def assert_error_shape(response: httpx.Response, status: int, error: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) <= {"error", "code", "message", "details"}, body
    assert body["code"] == status
    assert isinstance(body["error"], str)
    assert body["error"].islower()
    assert " " not in body["error"]
    assert isinstance(body["message"], str)
    assert body["message"]
    assert "Traceback" not in response.text
    if error is not None:
        assert body["error"] == error, body
    return body


class ServerThread:
    """A real ``Runtime`` (store, uvicorn) serving on a loopback port from its own thread and event loop,
    so one server can outlive the event loops of the tests that use it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="comfyfleet-test-server", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runtime: Runtime | None = None
        self._error: BaseException | None = None

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        async with Runtime(self.settings) as runtime, asyncio.TaskGroup() as group:
            self._runtime = runtime
            group.create_task(runtime.run(), name="runtime")
            port = await runtime.wait_listening()
            self.url = f"http://127.0.0.1:{port}"
            self._ready.set()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout=30) or self._error is not None:
            raise RuntimeError(f"the test server did not start: {self._error!r}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._runtime is not None:
            self._loop.call_soon_threadsafe(self._runtime.request_stop)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the test server did not stop"
        if self._error is not None:
            raise self._error
