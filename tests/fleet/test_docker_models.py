"""A docker pool with a model manifest, both ways model files reach containers: the worker's folder and the
host cache mounted (``models: mount``), and the companion pulling from the control plane into a container
that has no host mount (``models: companion``). The same test passes for both."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleet_helpers import docker_image

from comfyfleet.config import load_settings
from comfyfleet.fleet.manager import FleetManager
from comfyfleet.runtime import Runtime
from support import eventually

# The models tests' loopback file server (counts requests, serves Range), loaded from its folder.
_spec = importlib.util.spec_from_file_location(
    "file_server", Path(__file__).parents[1] / "models" / "file_server.py"
)
assert _spec is not None
assert _spec.loader is not None
file_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(file_server)

EMULATOR = ["python", "-m", "comfyfleet", "emulator", "--host", "0.0.0.0", "--port", "8188",
            "--extra-model-paths-config", "{extra_model_paths}", "--strict-models"]  # fmt: skip
CHECKPOINT = "fleet-base.safetensors"


def _bridge_gateway() -> str:
    """The host's address on Docker's default bridge: where containers reach the control plane."""
    import docker

    client = docker.from_env()
    try:
        config = client.networks.get("bridge").attrs["IPAM"]["Config"][0]
        # dockerd 20.10 leaves the default bridge's gateway out: it is the subnet's first address.
        return str(config.get("Gateway") or next(ipaddress.ip_network(config["Subnet"]).hosts()))
    finally:
        client.close()


def _mounts(worker_id: str) -> list[dict[str, Any]]:
    import docker

    client = docker.from_env()
    try:
        found = client.api.containers(all=True, filters={"label": f"comfyfleet.worker-id={worker_id}"})
        mounts: list[dict[str, Any]] = client.api.inspect_container(found[0]["Id"])["Mounts"]
        return mounts
    finally:
        client.close()


@pytest.fixture
def containers_removed(namespace: str) -> Iterator[None]:
    """This test's containers are removed after it (they outlive the control plane by design)."""
    yield
    import docker

    client = docker.from_env()
    try:
        for container in client.api.containers(
            all=True, filters={"label": f"comfyfleet.namespace={namespace}"}
        ):
            client.api.remove_container(container["Id"], force=True)
    finally:
        client.close()


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def _service(
    tmp_path: Path, namespace: str, pool: dict[str, Any], host: str, port: int
) -> AsyncIterator[tuple[FleetManager, httpx.AsyncClient]]:
    settings = load_settings(
        store=f"sqlite:///{tmp_path / 'comfyfleet.db'}",
        outputs=str(tmp_path / "outputs"),
        host=host,
        port=port,
        pools=[pool],
        models={"cache_dir": str(tmp_path / "cache"), "workers_dir": str(tmp_path / "workers")},
        fleet={"namespace": namespace, "probe_interval_s": 0.2, "reconcile_interval_s": 0.2},
    )
    async with Runtime(settings) as runtime:
        running = asyncio.ensure_future(runtime.run())
        try:
            await runtime.wait_listening()
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as http:
                yield runtime.services.fleet, http
        finally:
            runtime.request_stop()
            await running


def _checkpoint_task(seed: int) -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a lighthouse"}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": seed, "steps": 1, "cfg": 7, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["5", 0], "denoise": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "docker-models"}},
    }  # fmt: skip


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mount", "companion"])
@pytest.mark.usefixtures("containers_removed")
async def test_docker_workers_get_the_pool_manifest_once_per_host(
    tmp_path: Path, namespace: str, mode: str
) -> None:
    image = docker_image()
    host = _bridge_gateway()
    port = _free_port(host)
    data = b"fleet checkpoint bytes " * 4096
    command = EMULATOR if mode == "mount" else ["python", "-m", "comfyfleet", "companion", "--", *EMULATOR]
    with file_server.FileServer().running() as files:
        files.files[CHECKPOINT] = data
        pool = {
            "name": "dock",
            "provider": "docker",
            "min_workers": 2,
            "max_workers": 2,
            "startup_timeout_s": 90,
            "models": [
                {
                    "url": files.url(CHECKPOINT),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "folder": "checkpoints",
                }
            ],
            "models_allow_private": True,
            "settings": {
                "image": image,
                "command": command,
                "stop_timeout_s": 2,
                "models": mode,
                "control_plane_url": f"http://{host}:{port}",
            },
        }
        async with _service(tmp_path, namespace, pool, host, port) as (fleet, http):

            async def two_ready() -> bool:
                return len(fleet.usable_workers()) == 2

            await eventually(two_ready, what="two containers ready with the manifest", within=90)
            assert files.requests[CHECKPOINT] == 1, (
                "one download for the host, whatever the number of workers"
            )
            for worker in fleet.usable_workers():
                assert worker.info["models"]["state"] == "ready"
                assert worker.endpoint is not None
                info = (await http.get(f"{worker.endpoint}/object_info/CheckpointLoaderSimple")).json()
                assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [CHECKPOINT]
                mounted = {mount["Destination"] for mount in _mounts(worker.id)}
                if mode == "mount":
                    assert mounted == {
                        str(tmp_path / "workers" / worker.id),
                        str(tmp_path / "cache" / "sha256"),
                    }
                else:
                    assert mounted == set()
            task_ids = []
            for seed in (1, 2, 3, 4):
                answer = await http.post("/api/v1/tasks", json={"payload": _checkpoint_task(seed)})
                assert answer.status_code == 201, answer.text
                task_ids.append(answer.json()["id"])

            async def all_completed() -> bool:
                tasks = [(await http.get(f"/api/v1/tasks/{task_id}")).json() for task_id in task_ids]
                assert not [task for task in tasks if task["status"] in ("failed", "cancelled")], tasks
                return all(task["status"] == "completed" for task in tasks)

            await eventually(
                all_completed, what="the tasks using the manifest's checkpoint complete", within=90
            )
        assert files.requests[CHECKPOINT] == 1


def test_companion_mode_without_a_control_plane_url_is_a_clear_config_error() -> None:
    from comfyfleet.config import PoolConfig
    from comfyfleet.fleet.errors import FleetConfigError
    from comfyfleet.fleet.providers import ProviderContext, build_provider

    pool = PoolConfig(name="dock", provider="docker", settings={"image": "any", "models": "companion"})
    with pytest.raises(FleetConfigError, match="models: companion needs control_plane_url"):
        build_provider(pool, ProviderContext(installation="x"))
