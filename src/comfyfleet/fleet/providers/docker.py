"""``docker``: ComfyUI containers through the Docker Engine API (the Docker SDK, extra ``docker``).

- Labels ``comfyfleet.managed=true``, ``comfyfleet.namespace``, ``comfyfleet.installation``,
  ``comfyfleet.worker-id``, ``comfyfleet.pool`` (plus any configured): how ``list_ours`` finds containers after a
  restart, and how the reaper knows them. ``list_ours`` filters on the installation label, so the containers of
  another installation on the same engine (same namespace and pool names, another store) are never touched.
- The container port (8188) is published by the engine on a host port it picks (``{"8188/tcp": (host_ip,
  None)}``) and read back from inspect; with ``endpoint: network`` the worker is reached on its container
  address instead (comfyfleet itself running in the same Docker network).
- ``init=True`` so ComfyUI (PID 1 otherwise) stops on SIGTERM at once; GPUs via ``device_requests``; model
  volumes; an optional network; the image is never pulled unless ``pull: true`` (a missing image is a clear
  error, not a silent download of gigabytes).
- Model files (docs/models.md, "Providers"), by ``models``:
  - ``mount`` (default): each worker's own folder (``<workers_dir>/<worker_id>``: ``models/`` and its
    ``extra_model_paths.yaml``) and the host's model cache are bind-mounted read-only *at the same paths* as on
    the host, so the folder's hard links (or, across file systems, symbolic links into the cache) and the paths
    in the yaml are valid inside as they are (of the cache, only ``sha256/``, the verified files). comfyfleet fills the folder while the container boots (the pool's
    manifest) and before a task's prompt (its own models); ComfyUI re-reads it. Needs the engine on this host.
  - ``companion``: nothing of the host is mounted; ``comfyfleet companion`` in the image pulls the manifest's
    files from the control plane (``control_plane_url``, the worker's token, verified) before ComfyUI starts.
    Tasks bringing their own models are not placed on these workers.
  - ``none``: neither; the image or ``volumes`` hold the files.
  The command may name the folder inside the container: ``{models_dir}``, ``{extra_model_paths}``.
- Every SDK call blocks, so each runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from comfyfleet.fleet.errors import FleetClosed, ProviderRejected, ProviderUnavailable
from comfyfleet.fleet.providers.base import Instance, InstanceState, ProviderHandle, parse_pool_settings
from comfyfleet.models.links import worker_paths

try:
    import docker
    import docker.errors
    from docker.types import DeviceRequest
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the docker provider needs the Docker SDK: pip install 'comfyfleet[docker]'") from exc

if TYPE_CHECKING:
    from docker.models.containers import Container

    from comfyfleet.config import PoolConfig
    from comfyfleet.fleet.providers import ProviderContext

T = TypeVar("T")

LABEL_MANAGED = "comfyfleet.managed"
LABEL_NAMESPACE = "comfyfleet.namespace"
LABEL_INSTALLATION = "comfyfleet.installation"
LABEL_WORKER = "comfyfleet.worker-id"
LABEL_POOL = "comfyfleet.pool"

_STATES = {
    "created": InstanceState.PROVISIONING,
    "restarting": InstanceState.PROVISIONING,
    "running": InstanceState.RUNNING,
    "paused": InstanceState.STOPPED,
    "exited": InstanceState.FAILED,
    "dead": InstanceState.FAILED,
    "removing": InstanceState.GONE,
}


class VolumeMount(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str  # a host path or a named volume
    target: str
    read_only: bool = False


class DockerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str
    command: str | list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    port: int = Field(default=8188, gt=0, lt=65536)  # where ComfyUI listens inside the container
    host_ip: str = "127.0.0.1"  # where the engine publishes it
    endpoint: Literal["published", "network"] = "published"
    network: str | None = None
    volumes: list[VolumeMount] = Field(default_factory=list)
    gpus: Literal["all"] | int | list[str] | None = None  # all GPUs, a count, or device ids
    pull: bool = False
    labels: dict[str, str] = Field(default_factory=dict)
    shm_size: str | None = None
    mem_limit: str | None = None
    stop_timeout_s: int = Field(default=10, ge=0)
    docker_host: str | None = None  # default: DOCKER_HOST / the local socket
    engine_timeout_s: float = Field(default=60.0, gt=0)
    models: Literal["mount", "companion", "none"] = "mount"  # how model files reach the containers
    control_plane_url: str | None = None  # companion: the control plane's URL as the containers reach it
    companion_dir: str = "/opt/comfyfleet-models"  # companion: its folder inside the container

    @model_validator(mode="after")
    def _companion_needs_a_url(self) -> DockerSettings:
        if self.models == "companion" and not self.control_plane_url:
            raise ValueError(
                "models: companion needs control_plane_url (the control plane as containers reach it)"
            )
        return self


@dataclass(frozen=True, slots=True)
class ContainerModels:
    volumes: dict[str, dict[str, str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    placeholders: dict[str, str] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)


def _with_placeholders(command: str | list[str], values: dict[str, str]) -> str | list[str]:
    """``{models_dir}`` and ``{extra_model_paths}`` replaced; any other brace is left to the command."""

    def fill(part: str) -> str:
        for name, value in values.items():
            part = part.replace("{" + name + "}", value)
        return part

    return fill(command) if isinstance(command, str) else [fill(part) for part in command]


class DockerProvider:
    kind = "docker"

    def __init__(self, pool: PoolConfig, context: ProviderContext) -> None:
        self.pool = pool.name
        self.settings = parse_pool_settings(DockerSettings, pool)
        self._namespace = context.namespace
        self._installation = context.installation
        self._context = context
        self._manifest = [spec.model_dump() for spec in pool.models]
        self._client: docker.DockerClient | None = None

    async def __aenter__(self) -> Self:
        def connect() -> docker.DockerClient:
            if self.settings.docker_host:
                return docker.DockerClient(
                    base_url=self.settings.docker_host, timeout=int(self.settings.engine_timeout_s)
                )
            return docker.from_env(timeout=int(self.settings.engine_timeout_s))

        try:
            self._client = await asyncio.to_thread(connect)
        except docker.errors.DockerException as exc:
            raise ProviderUnavailable(
                f"docker pool {self.pool!r}: cannot reach the Docker engine: {exc}"
            ) from exc
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)
            self._client = None

    @property
    def stops_with_control_plane(self) -> bool:
        return False

    def _docker(self) -> docker.DockerClient:
        if self._client is None:
            raise FleetClosed(f"docker pool {self.pool!r}: the provider is not open")
        return self._client

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except docker.errors.ImageNotFound as exc:
            raise ProviderRejected(
                f"docker pool {self.pool!r}: image {self.settings.image!r} is not in the engine "
                "(build or load it, or set pull: true)"
            ) from exc
        except docker.errors.APIError as exc:
            if exc.status_code is not None and 400 <= exc.status_code < 500 and exc.status_code != 404:
                raise ProviderRejected(f"docker pool {self.pool!r}: {exc.explanation or exc}") from exc
            raise ProviderUnavailable(f"docker pool {self.pool!r}: {exc.explanation or exc}") from exc
        except docker.errors.DockerException as exc:
            raise ProviderUnavailable(f"docker pool {self.pool!r}: {exc}") from exc

    def container_name(self, worker_id: str) -> str:
        return f"{self._namespace}-{worker_id}"

    def _labels(self, worker_id: str) -> dict[str, str]:
        return {
            **self.settings.labels,
            LABEL_MANAGED: "true",
            LABEL_NAMESPACE: self._namespace,
            LABEL_INSTALLATION: self._installation,
            LABEL_WORKER: worker_id,
            LABEL_POOL: self.pool,
        }

    def _device_requests(self) -> list[DeviceRequest] | None:
        gpus = self.settings.gpus
        if gpus is None:
            return None
        if gpus == "all":
            return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
        if isinstance(gpus, int):
            return [DeviceRequest(count=gpus, capabilities=[["gpu"]])]
        return [DeviceRequest(device_ids=list(gpus), capabilities=[["gpu"]])]

    async def create(self, worker_id: str) -> ProviderHandle:
        client = self._docker()
        settings = self.settings
        if settings.pull:
            await self._call(lambda: client.images.pull(settings.image))
        port_key = f"{settings.port}/tcp"
        models = await asyncio.to_thread(self._model_files, worker_id)
        options: dict[str, Any] = {
            "name": self.container_name(worker_id),
            "labels": self._labels(worker_id),
            "environment": {
                **settings.env,
                **models.env,
                "COMFYFLEET_WORKER_ID": worker_id,
                "COMFYFLEET_POOL": self.pool,
            },
            "ports": {port_key: (settings.host_ip, None)},
            "init": True,
            "detach": True,
            "volumes": {
                **models.volumes,
                **{
                    mount.source: {"bind": mount.target, "mode": "ro" if mount.read_only else "rw"}
                    for mount in settings.volumes
                },
            },
            "stop_signal": "SIGTERM",
        }
        if settings.command is not None:
            options["command"] = _with_placeholders(settings.command, models.placeholders)
        if settings.network:
            options["network"] = settings.network
        if (requests := self._device_requests()) is not None:
            options["device_requests"] = requests
        if settings.shm_size:
            options["shm_size"] = settings.shm_size
        if settings.mem_limit:
            options["mem_limit"] = settings.mem_limit

        container: Container = await self._call(lambda: client.containers.create(settings.image, **options))
        try:
            await self._call(container.start)
            await self._call(container.reload)
        except BaseException:
            # Created but not started: remove it here so a failed start leaves nothing behind.
            await asyncio.shield(self._remove_quietly(container.id))
            raise
        return ProviderHandle(
            container.id,
            endpoint=self._endpoint(container.attrs),
            info={"container_name": container.name, **models.info},
        )

    def _model_files(self, worker_id: str) -> ContainerModels:
        """The mounts, variables, placeholders and worker info of ``settings.models`` for one worker."""
        mode = self.settings.models
        if mode == "none":
            return ContainerModels()
        if mode == "companion":
            token = self._context.worker_token
            if token is None:
                raise ProviderRejected(
                    f"docker pool {self.pool!r}: models: companion needs the model service"
                )
            url = str(self.settings.control_plane_url).rstrip("/")
            manifest = [
                {**spec, "url": f"{url}/api/v1/models/blobs/{spec['sha256']}"} for spec in self._manifest
            ]
            inside = PurePosixPath(self.settings.companion_dir)
            env = {
                "COMFYFLEET_COMPANION_URL": url,
                "COMFYFLEET_COMPANION_TOKEN": token(worker_id),
                "COMFYFLEET_COMPANION_MANIFEST": json.dumps(manifest),
                "COMFYFLEET_COMPANION_DIR": str(inside),
            }
            paths = {
                "models_dir": str(inside / "models"),
                "extra_model_paths": str(inside / "extra_model_paths.yaml"),
            }
            return ContainerModels(env=env, placeholders=paths, info={"models_via": "companion"})
        folder = worker_paths(self._context.workers_dir, worker_id)
        cache = self._context.cache_dir.absolute() / "sha256"  # the verified files only, not the token secret
        cache.mkdir(parents=True, exist_ok=True)
        paths = {"models_dir": str(folder.models_dir), "extra_model_paths": str(folder.extra_model_paths)}
        return ContainerModels(
            volumes={str(p): {"bind": str(p), "mode": "ro"} for p in (folder.root, cache)},
            env={
                "COMFYFLEET_MODELS_DIR": paths["models_dir"],
                "COMFYFLEET_EXTRA_MODEL_PATHS": paths["extra_model_paths"],
            },
            placeholders=paths,
            info={"models_dir": paths["models_dir"]},
        )

    async def _remove_quietly(self, container_id: str | None) -> None:
        if container_id is None:
            return
        try:
            await self.terminate(container_id)
        except Exception:  # the reaper will find it by its labels
            return

    def _endpoint(self, attrs: dict[str, Any]) -> str | None:
        settings_ = attrs.get("NetworkSettings") or {}
        if self.settings.endpoint == "network":
            networks = settings_.get("Networks") or {}
            net = networks.get(self.settings.network) if self.settings.network else None
            net = net or next(iter(networks.values()), None)
            address = (net or {}).get("IPAddress")
            return f"http://{address}:{self.settings.port}" if address else None
        bindings = (settings_.get("Ports") or {}).get(f"{self.settings.port}/tcp") or []
        for binding in bindings:
            host_port = binding.get("HostPort")
            if host_port:
                host = binding.get("HostIp") or "127.0.0.1"
                if host in ("0.0.0.0", "::", ""):
                    host = "127.0.0.1"
                if ":" in host:
                    host = f"[{host}]"
                return f"http://{host}:{host_port}"
        return None

    def _instance(self, attrs: dict[str, Any]) -> Instance:
        state = attrs.get("State") or {}
        raw = str(state.get("Status") or "unknown")
        mapped = _STATES.get(raw, InstanceState.UNKNOWN)
        error = None
        if mapped is InstanceState.FAILED:
            error = f"container {raw} with exit code {state.get('ExitCode')}"
            if state.get("OOMKilled"):
                error += " (OOM killed)"
            if state.get("Error"):
                error += f": {state['Error']}"
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        return Instance(
            provider_id=str(attrs.get("Id")),
            state=mapped,
            worker_id=labels.get(LABEL_WORKER),
            endpoint=self._endpoint(attrs) if mapped is InstanceState.RUNNING else None,
            error=error,
            raw_state=raw,
        )

    async def describe(self, provider_id: str) -> Instance:
        client = self._docker()
        try:
            attrs = await self._call(lambda: client.api.inspect_container(provider_id))
        except ProviderUnavailable as exc:
            if isinstance(exc.__cause__, docker.errors.NotFound):
                return Instance(provider_id, InstanceState.GONE, raw_state="gone")
            raise
        return self._instance(attrs)

    async def terminate(self, provider_id: str) -> None:
        client = self._docker()

        def stop_and_remove() -> None:
            try:
                container = client.containers.get(provider_id)
            except docker.errors.NotFound:
                return
            try:
                container.stop(timeout=self.settings.stop_timeout_s)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError:
                pass  # already stopping or dead: removal below settles it
            try:
                container.remove(force=True, v=False)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if exc.status_code == 409 and "already in progress" in str(exc.explanation or ""):
                    return
                raise

        await self._call(stop_and_remove)

    async def list_ours(self) -> list[Instance]:
        client = self._docker()
        filters = {
            "label": [
                f"{LABEL_MANAGED}=true",
                f"{LABEL_NAMESPACE}={self._namespace}",
                f"{LABEL_INSTALLATION}={self._installation}",
                f"{LABEL_POOL}={self.pool}",
            ]
        }
        summaries = await self._call(lambda: client.api.containers(all=True, filters=filters))
        instances = []
        for summary in summaries:
            container_id = str(summary["Id"])
            try:
                attrs = await self._call(partial(client.api.inspect_container, container_id))
            except ProviderUnavailable as exc:
                if isinstance(exc.__cause__, docker.errors.NotFound):
                    continue
                raise
            instances.append(self._instance(attrs))
        return [instance for instance in instances if instance.state is not InstanceState.GONE]

    def adopt(self, provider_id: str, worker_id: str) -> None:
        """Nothing to remember: the engine keeps the labels."""
