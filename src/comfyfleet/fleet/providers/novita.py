"""``novita``: Novita AI GPU instances over their REST API (``docs/providers.md``; facts in the Novita reference).

- Instances have no labels, so the installation and the worker id go in the name:
  ``<namespace>-<installation id>-<worker id>`` (the worker id starts with the pool name; at most 100 characters
  of the 255 allowed). ``list_ours`` pages through ``GET /gpu/instances`` with the ``name`` filter and keeps
  only names of exactly our shape, so another installation's instances (same namespace and pool names, another
  store) are never ours.
- Create returns ``{"id"}`` at once; the instance then moves ``toCreate → creating → pulling → running``.
  The ComfyUI URL is read from get-instance's ``portMappings[].endpoint`` for port 8188 (the list's items do
  not carry it), with ``https://`` added when it has no scheme; the manager still probes ``/system_stats``.
- ``statusError.message`` is surfaced: the instance counts as failed, and the manager deletes it and backs
  off before the next start.
- Terminate is delete (``POST /gpu/instance/delete``); not-found (HTTP 404 or ``reason: RESOURCE_NOT_FOUND``)
  is success.
- 429 and 5xx (and transport errors) are retried with exponential back-off and jitter, honouring
  ``Retry-After``. Create is not idempotent: before retrying a create whose answer was lost, the provider
  looks for an instance that already has the worker's name and takes that one instead of creating twice.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal, Self

import httpx
import stamina
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from comfyfleet.fleet.errors import FleetClosed, ProviderError, ProviderRejected, ProviderUnavailable
from comfyfleet.fleet.providers.base import (
    Instance,
    InstanceState,
    ProviderHandle,
    parse_pool_settings,
    worker_belongs_to_pool,
    worker_id_from_name,
)

if TYPE_CHECKING:
    from comfyfleet.config import PoolConfig
    from comfyfleet.fleet.providers import ProviderContext

DEFAULT_BASE_URL = "https://api.novita.ai/gpu-instance/openapi/v1"

STATUS_MAP: dict[str, InstanceState] = {
    "toCreate": InstanceState.PROVISIONING,
    "creating": InstanceState.PROVISIONING,
    "pulling": InstanceState.PROVISIONING,
    "running": InstanceState.RUNNING,
    "toStart": InstanceState.PROVISIONING,
    "starting": InstanceState.PROVISIONING,
    "toStop": InstanceState.STOPPED,
    "stopping": InstanceState.STOPPED,
    "exited": InstanceState.STOPPED,
    "toRestart": InstanceState.PROVISIONING,
    "restarting": InstanceState.PROVISIONING,
    "toRemove": InstanceState.GONE,
    "removing": InstanceState.GONE,
    "removed": InstanceState.GONE,
    "toReset": InstanceState.PROVISIONING,
    "resetting": InstanceState.PROVISIONING,
    "migrating": InstanceState.PROVISIONING,
    "freezing": InstanceState.UNKNOWN,
}


class NetworkStorage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    mount_point: str


class NovitaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    product_id: str
    image_url: str
    gpu_num: int = Field(default=1, ge=1, le=8)
    rootfs_size: int = Field(default=60, ge=10)
    image_auth_id: str | None = None
    command: str = ""
    envs: dict[str, str] = Field(default_factory=dict)
    port: int = Field(default=8188, gt=0, lt=65536)
    cluster_id: str | None = None
    network_storages: list[NetworkStorage] = Field(default_factory=list)
    billing_mode: Literal["onDemand", "spot", "monthly"] = "onDemand"
    kind: Literal["gpu", "cpu"] = "gpu"
    base_url: str = DEFAULT_BASE_URL
    api_key: SecretStr | None = None  # prefer the environment variable below
    api_key_env: str = "NOVITA_API_KEY"
    request_timeout_s: float = Field(default=30.0, gt=0)
    retry_attempts: int = Field(default=6, ge=1)
    retry_timeout_s: float = Field(default=120.0, gt=0)
    page_size: int = Field(default=100, ge=1, le=1000)


class _NotFound(ProviderError):
    """The API says the instance does not exist (HTTP 404 or reason RESOURCE_NOT_FOUND)."""


class _Transient(ProviderUnavailable):
    """Worth retrying. ``may_have_happened``: the request may have been carried out although it failed (a
    lost answer), unlike a 429 that refused it up front."""

    def __init__(
        self, message: str, retry_after_s: float | None = None, *, may_have_happened: bool = True
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.may_have_happened = may_have_happened


def _backoff_hook(exc: Exception) -> bool | float:
    if isinstance(exc, _Transient):
        return exc.retry_after_s if exc.retry_after_s is not None else True
    return False


def normalise_endpoint(endpoint: str) -> str:
    endpoint = endpoint.strip().rstrip("/")
    return endpoint if "://" in endpoint else f"https://{endpoint}"


class NovitaProvider:
    kind = "novita"

    def __init__(
        self, pool: PoolConfig, context: ProviderContext, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.pool = pool.name
        self.settings = parse_pool_settings(NovitaSettings, pool)
        self._prefix = f"{context.namespace}-{context.installation}-"
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        key = (
            self.settings.api_key.get_secret_value()
            if self.settings.api_key
            else os.environ.get(self.settings.api_key_env)
        )
        if not key:
            from comfyfleet.fleet.errors import FleetConfigError

            raise FleetConfigError(
                f"pool {pool.name!r} (novita): no API key; set {self.settings.api_key_env} in the environment"
            )
        self._api_key = key

    async def __aenter__(self) -> Self:
        self._client = httpx.AsyncClient(
            base_url=self.settings.base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json"},
            timeout=httpx.Timeout(self.settings.request_timeout_s),
            transport=self._transport,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def stops_with_control_plane(self) -> bool:
        return False

    # -- HTTP -------------------------------------------------------------------------------------------------

    async def _request_once(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._client is None:
            raise FleetClosed(f"novita pool {self.pool!r}: the provider is not open")
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _Transient(f"novita API unreachable: {type(exc).__name__}: {exc}") from exc
        if response.is_success:
            if not response.content:
                return {}
            try:
                return response.json()
            except ValueError as exc:
                raise ProviderUnavailable(f"novita API answered {method} {path} with non-JSON") from exc
        raise self._error(method, path, response)

    def _error(self, method: str, path: str, response: httpx.Response) -> ProviderError:
        try:
            body = response.json()
        except ValueError:
            body = None
        reason = message = ""
        if isinstance(body, dict):
            reason = str(body.get("reason") or "")
            message = str(body.get("message") or "")
            nested = body.get("error")
            if not message and isinstance(nested, dict):
                message = str(nested.get("message") or "")
        text = f"novita {method} {path}: HTTP {response.status_code}"
        if reason:
            text += f" {reason}"
        if message:
            text += f": {message}"
        elif not isinstance(body, dict):
            text += f": {response.text[:200]}"
        status = response.status_code
        if status == 404 or reason == "RESOURCE_NOT_FOUND":
            return _NotFound(text)
        if status == 429 or status >= 500:
            retry_after: float | None = None
            header = response.headers.get("Retry-After")
            if header is not None:
                try:
                    retry_after = max(float(header), 0.0)
                except ValueError:
                    retry_after = None
            return _Transient(text, retry_after, may_have_happened=status != 429)
        if status in (401, 403):
            return ProviderRejected(f"{text} (check the API key in {self.settings.api_key_env})")
        return ProviderRejected(text)

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        async for attempt in stamina.retry_context(
            on=_backoff_hook,
            attempts=self.settings.retry_attempts,
            timeout=self.settings.retry_timeout_s,
            wait_initial=0.5,
            wait_max=20.0,
        ):
            with attempt:
                return await self._request_once(method, path, **kwargs)
        raise AssertionError("unreachable: stamina re-raises the last error")  # pragma: no cover

    # -- the protocol -----------------------------------------------------------------------------------------

    def instance_name(self, worker_id: str) -> str:
        return f"{self._prefix}{worker_id}"

    def _create_body(self, worker_id: str) -> dict[str, Any]:
        settings = self.settings
        body: dict[str, Any] = {
            "name": self.instance_name(worker_id),
            "productId": settings.product_id,
            "gpuNum": settings.gpu_num,
            "rootfsSize": settings.rootfs_size,
            "imageUrl": settings.image_url,
            "ports": f"{settings.port}/http",
            "envs": [{"key": key, "value": value} for key, value in settings.envs.items()],
            "command": settings.command,
            "kind": settings.kind,
            "billingMode": settings.billing_mode,
            "month": 0,
        }
        if settings.image_auth_id:
            body["imageAuthId"] = settings.image_auth_id
        if settings.cluster_id:
            body["clusterId"] = settings.cluster_id
        if settings.network_storages:
            body["networkStorages"] = [
                {"Id": s.id, "mountPoint": s.mount_point} for s in settings.network_storages
            ]
        return body

    async def create(self, worker_id: str) -> ProviderHandle:
        body = self._create_body(worker_id)
        name = body["name"]
        lost_answer = False
        answer: Any = None
        async for attempt in stamina.retry_context(
            on=_backoff_hook,
            attempts=self.settings.retry_attempts,
            timeout=self.settings.retry_timeout_s,
            wait_initial=0.5,
            wait_max=20.0,
        ):
            with attempt:
                if lost_answer:
                    # The previous try may have created it before its answer was lost: never create twice.
                    existing = await self._find_by_name(name)
                    if existing is not None:
                        return ProviderHandle(existing, info={"instance_name": name})
                try:
                    answer = await self._request_once("POST", "/gpu/instance/create", json=body)
                except _Transient as exc:
                    lost_answer = lost_answer or exc.may_have_happened
                    raise
        instance_id = answer.get("id") if isinstance(answer, dict) else None
        if not instance_id:
            raise ProviderUnavailable(f"novita create answered without an id: {answer!r}")
        return ProviderHandle(str(instance_id), info={"instance_name": name})

    async def _find_by_name(self, name: str) -> str | None:
        for item in await self._list(name):
            if item.get("name") == name and item.get("status") not in ("removed", "removing", "toRemove"):
                return str(item.get("id"))
        return None

    async def _list(self, name_filter: str) -> list[dict[str, Any]]:
        """Every instance matching the (fuzzy) name filter, across pages. Whether pages count from 0 or 1 is
        not documented: start at 0, stop at a short page or at ``total``, and drop repeats."""
        seen: dict[str, dict[str, Any]] = {}
        page = 0
        stale_pages = 0  # pages that brought nothing new: one is expected when 0 and 1 are the same page
        while True:
            answer = await self._request(
                "GET",
                "/gpu/instances",
                params={"pageSize": self.settings.page_size, "pageNum": page, "name": name_filter},
            )
            items = answer.get("instances") if isinstance(answer, dict) else None
            items = items if isinstance(items, list) else []
            new = 0
            for item in items:
                if isinstance(item, dict) and item.get("id") is not None and str(item["id"]) not in seen:
                    seen[str(item["id"])] = item
                    new += 1
            total = answer.get("total") if isinstance(answer, dict) else None
            if len(items) < self.settings.page_size or (isinstance(total, int) and len(seen) >= total):
                break
            stale_pages = stale_pages + 1 if new == 0 else 0
            if stale_pages >= 2 or page >= 10_000:
                break  # the server ignores pageNum: what we have is all we can get
            page += 1
        return list(seen.values())

    def _instance(self, item: dict[str, Any], provider_id: str) -> Instance:
        raw = str(item.get("status") or "")
        state = STATUS_MAP.get(raw, InstanceState.UNKNOWN)
        status_error = item.get("statusError")
        error = None
        if isinstance(status_error, dict) and status_error.get("message"):
            error = str(status_error["message"])
            if status_error.get("state"):
                error = f"{status_error['state']}: {error}"
            if state is not InstanceState.GONE:
                state = InstanceState.FAILED
        endpoint = None
        if state is InstanceState.RUNNING:
            for mapping in item.get("portMappings") or []:
                if not isinstance(mapping, dict):
                    continue
                try:
                    port = int(mapping.get("port") or 0)
                except (TypeError, ValueError):
                    continue
                if port == self.settings.port and mapping.get("endpoint"):
                    endpoint = normalise_endpoint(str(mapping["endpoint"]))
                    break
        name = str(item.get("name") or "")
        return Instance(
            provider_id=provider_id,
            state=state,
            worker_id=worker_id_from_name(name, self._prefix),
            endpoint=endpoint,
            error=error,
            raw_state=raw or None,
        )

    async def describe(self, provider_id: str) -> Instance:
        try:
            item = await self._request("GET", "/gpu/instance", params={"instanceId": provider_id})
        except _NotFound:
            return Instance(provider_id, InstanceState.GONE, raw_state="not found")
        if not isinstance(item, dict):
            raise ProviderUnavailable(f"novita get-instance answered {item!r}")
        return self._instance(item, provider_id)

    async def terminate(self, provider_id: str) -> None:
        try:
            await self._request("POST", "/gpu/instance/delete", json={"instanceId": provider_id})
        except _NotFound:
            return

    async def list_ours(self) -> list[Instance]:
        prefix = f"{self._prefix}{self.pool}-"
        found = []
        for item in await self._list(prefix):
            instance = self._instance(item, str(item["id"]))
            if instance.worker_id is None or not worker_belongs_to_pool(instance.worker_id, self.pool):
                continue
            if instance.state is InstanceState.GONE:
                continue
            found.append(instance)
        return found

    def adopt(self, provider_id: str, worker_id: str) -> None:
        """Nothing to remember: the instance name carries the worker id."""
