"""No secret in any log line: a real ``comfyfleet serve`` at debug level is called on every route of its
OpenAPI document and its gateway with API keys (as ``Authorization`` and as ``?token=``), its WebSocket with
``?token=``, the dashboard with its cookie, a webhook with a secret and a token in its URL, an input URL with
a token, a Novita pool with an API key and a store URL with a password. Not one of them appears in its log."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from aiohttp import web
from PIL import Image
from websockets.asyncio.client import connect

from comfyfleet.dispatch.inputs import InputError, fetch_url
from comfyfleet.emulators.comfyui import EmulatorOptions, EmulatorServer
from comfyfleet.emulators.novita import NovitaEmulator, NovitaEmulatorOptions
from comfyfleet.redaction import redact
from support import ServeProcess, eventually


def _secret(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@dataclass
class Secrets:
    tenant_key: str = field(default_factory=lambda: _secret("tenant"))
    admin_key: str = field(default_factory=lambda: _secret("admin"))
    server_webhook_secret: str = field(default_factory=_webhook_secret)
    task_webhook_secret: str = field(default_factory=_webhook_secret)
    webhook_url_token: str = field(default_factory=lambda: _secret("hooktoken"))
    input_url_token: str = field(default_factory=lambda: _secret("inputtoken"))
    novita_key: str = field(default_factory=lambda: _secret("novita"))
    store_password: str = field(default_factory=lambda: _secret("pgpass"))

    def every(self) -> dict[str, str]:
        """Each secret, and the random part of each webhook secret on its own."""
        found = dict(vars(self))
        for name in ("server_webhook_secret", "task_webhook_secret"):
            found[f"{name} (base64)"] = found[name].removeprefix("whsec_")
        return found


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (8, 8), (200, 30, 30, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Outside:
    """A webhook receiver and an input file server, both insisting on the token in their URL."""

    url: str = ""
    hook_token: str = ""
    input_token: str = ""
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    delivered: asyncio.Event = field(default_factory=asyncio.Event)

    async def hook(self, request: web.Request) -> web.Response:
        if request.query.get("token") != self.hook_token:
            return web.Response(status=403)
        self.deliveries.append(await request.json())
        self.delivered.set()
        return web.Response(status=204)

    async def input_file(self, request: web.Request) -> web.Response:
        if request.query.get("token") != self.input_token:
            return web.Response(status=403)
        return web.Response(body=_png(), content_type="image/png")


@asynccontextmanager
async def outside_world(found: Secrets) -> AsyncIterator[Outside]:
    outside = Outside(hook_token=found.webhook_url_token, input_token=found.input_url_token)
    app = web.Application()
    app.router.add_post("/hook", outside.hook)
    app.router.add_get("/cat.png", outside.input_file)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    outside.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield outside
    finally:
        await runner.cleanup()


def _config(path: Path, found: Secrets, novita: NovitaEmulator) -> Path:
    config = {
        "api_keys": [
            {"key": found.tenant_key, "tenant": "alice"},
            {"key": found.admin_key, "tenant": "ops", "admin": True},
        ],
        "webhook_secret": found.server_webhook_secret,
        "dispatch": {"allow_private_input_urls": True},
        "pools": [
            {
                "name": "cloud",
                "provider": "novita",
                "min_workers": 0,
                "max_workers": 0,
                "settings": {
                    "product_id": "emu-rtx-4090-24g",
                    "image_url": "example.org/comfyui:latest",
                    "base_url": novita.api_base,
                    "api_key": found.novita_key,
                },
            }
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    return parts._replace(
        netloc=f"{parts.username or 'postgres'}:{password}@{parts.hostname}:{parts.port}"
    ).geturl()


def _graph() -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "cat"}},
    }


async def _call_every_documented_route(
    client: httpx.AsyncClient, key: str, task_id: str, worker_id: str, filename: str
) -> int:
    """Every operation of /openapi.json once with ``key``: the gateway's with ``?token=``, the rest with
    ``Authorization``. Workers are drained and removed last (the task has run by then)."""
    document = (await client.get("/openapi.json")).json()
    values = {
        "task_id": task_id,
        "prompt_id": task_id,
        "worker_id": worker_id,
        "filename": filename,
        "node_class": "SaveImage",
        "sha256": "0" * 64,  # a model blob (none cached: the route answers 404, which is logged like any)
    }
    bodies: dict[tuple[str, str], dict[str, Any]] = {
        ("post", "/api/v1/workflows/validate"): {"json": {"payload": _graph()}},
        ("patch", "/api/v1/tasks/{task_id}"): {"json": {"priority": 3}},
        ("post", "/prompt"): {"json": {"prompt": _graph()}},
        ("post", "/queue"): {"json": {"delete": [task_id]}},
        ("post", "/interrupt"): {"json": {"prompt_id": task_id}},
        ("post", "/history"): {"json": {"clear": True}},
        ("post", "/upload/image"): {"files": {"image": ("up.png", _png(), "image/png")}},
        ("post", "/upload/mask"): {
            "files": {"image": ("mask.png", _png(), "image/png")},
            "data": {"original_ref": json.dumps({"filename": "up.png", "subfolder": "", "type": "input"})},
        },
        ("get", "/view"): {"params": {"filename": "up.png", "type": "input"}},
    }
    operations = [
        (method, path)
        for path, methods in document["paths"].items()
        for method in methods
        if path not in ("/api/v1/tasks",)  # submitted with a webhook and inputs before
    ]
    operations.sort(key=lambda operation: operation[1].startswith("/api/v1/workers/{"))
    called = 0
    for method, path in operations:
        url = path.format(**{name: values[name] for name in values if "{" + name + "}" in path})
        options: dict[str, Any] = dict(bodies.get((method, path), {}))
        if path.startswith("/api/"):
            options["headers"] = {"Authorization": f"Bearer {key}"}
        else:
            options["params"] = {**options.get("params", {}), "token": key}
        if path.endswith("/events"):
            async with client.stream(method.upper(), url, **options) as response:
                assert response.status_code == 200, (method, path)
        else:
            response = await client.request(method.upper(), url, **options)
            assert response.status_code not in (401, 500), (method, path, response.text)
        called += 1
    return called


@pytest.mark.postgres
@pytest.mark.slow
async def test_no_api_key_webhook_secret_or_credential_reaches_the_log(
    tmp_path: Path, postgres_url: str
) -> None:
    found = Secrets()
    novita_options = NovitaEmulatorOptions(api_key=found.novita_key)
    async with (
        EmulatorServer(EmulatorOptions(base_dir=str(tmp_path / "emulator"))) as comfy,
        NovitaEmulator(novita_options) as novita,
        outside_world(found) as outside,
    ):
        await comfy.wait_ready()
        config = _config(tmp_path / "comfyfleet.yaml", found, novita)
        server = ServeProcess(
            tmp_path,
            "--config",
            str(config),
            "--store",
            _with_password(postgres_url, found.store_password),
            "--worker",
            comfy.url,
            "--outputs",
            str(tmp_path / "outputs"),
            "--log-level",
            "debug",
        ).start()
        try:
            url = await asyncio.to_thread(server.wait_listening)
            await _exercise(url, found, outside)
        finally:
            await server.stop_in_thread()
    log = server.log
    assert "api_listening" in log
    assert "WebSocket /ws" in log  # the handshake line that used to carry ?token=KEY
    leaked = {name: value for name, value in found.every().items() if value in log}
    assert not leaked, f"secrets in the log: {sorted(leaked)}"


async def _exercise(url: str, found: Secrets, outside: Outside) -> None:
    tenant = {"Authorization": f"Bearer {found.tenant_key}"}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        # The socket first, so it sees the gateway prompt's frames.
        ws_url = url.replace("http://", "ws://") + f"/ws?clientId=watcher&token={found.tenant_key}"
        async with connect(ws_url) as socket:
            assert json.loads(await asyncio.wait_for(socket.recv(), 10))["type"] == "status"
            submitted = await client.post(
                "/api/v1/tasks",
                headers=tenant,
                json={
                    "payload": _graph(),
                    "inputs": [
                        {"name": "cat.png", "url": f"{outside.url}/cat.png?token={found.input_url_token}"}
                    ],
                    "webhook": {
                        "url": f"{outside.url}/hook?token={found.webhook_url_token}",
                        "secret": found.task_webhook_secret,
                    },
                },
            )
            assert submitted.status_code == 201, submitted.text
            task_id = submitted.json()["id"]

            async def finished() -> dict[str, Any] | None:
                task: dict[str, Any] = (await client.get(f"/api/v1/tasks/{task_id}", headers=tenant)).json()
                return task if task["status"] in ("completed", "failed", "cancelled") else None

            task = await eventually(finished, within=20, what="the task ending")
            assert task["status"] == "completed", {
                k: task[k] for k in ("error", "error_kind", "error_details")
            }
        await asyncio.wait_for(outside.delivered.wait(), 20)
        # The socket again, with the key in a header (logged among the handshake's headers at debug level).
        bare_ws_url = url.replace("http://", "ws://") + "/ws?clientId=header"
        async with connect(
            bare_ws_url, additional_headers={"Authorization": f"Bearer {found.admin_key}"}
        ) as socket:
            assert json.loads(await asyncio.wait_for(socket.recv(), 10))["type"] == "status"
        workers = (await client.get("/api/v1/workers", headers=tenant)).json()["workers"]
        filename = task["result"]["outputs"][0]["filename"]
        # The tenant's key on every route, then the admin's (drain and remove need it).
        for key in (found.tenant_key, found.admin_key):
            called = await _call_every_documented_route(client, key, task_id, workers[0]["id"], filename)
            assert called >= 30
        # The dashboard: its login form, then its pages with the cookie.
        login = await client.post("/dashboard/login", data={"key": found.tenant_key, "next": "/"})
        assert login.status_code == 303
        assert (await client.get("/")).status_code == 200
        assert (await client.get(f"/tasks/{task_id}")).status_code == 200


async def test_an_input_urls_token_is_not_in_the_tasks_error(tmp_path: Path) -> None:
    found = Secrets()
    async with outside_world(found) as outside, httpx.AsyncClient() as http:
        url = f"{outside.url}/cat.png?token=wrong-{found.input_url_token}"
        with pytest.raises(InputError) as refused:
            await fetch_url(http, url, max_bytes=1 << 20, allow_private=True)
    assert "answered HTTP 403" in str(refused.value)
    assert found.input_url_token not in str(refused.value)
    assert "token=***" in str(refused.value)


def test_redaction_keeps_what_is_not_secret() -> None:
    line = "worker_exited worker_id=w-1 signal=15 task_id=t-1 url=http://h:8188/ws?clientId=a"
    assert redact(line) == line
    assert redact("GET /ws?clientId=a&token=abc&x=1") == "GET /ws?clientId=a&token=***&x=1"
