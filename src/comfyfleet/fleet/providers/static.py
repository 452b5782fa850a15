"""``static``: a fixed list of ComfyUI URLs that comfyfleet uses but never starts or stops.

Each URL backs at most one worker at a time; ``create`` hands out a free URL, ``terminate`` only releases it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

from comfyfleet.fleet.errors import ProviderRejected
from comfyfleet.fleet.providers.base import Instance, InstanceState, ProviderHandle, parse_pool_settings

if TYPE_CHECKING:
    from comfyfleet.config import PoolConfig
    from comfyfleet.fleet.providers import ProviderContext


class StaticSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(min_length=1)

    @field_validator("urls")
    @classmethod
    def _normalise(cls, urls: list[str]) -> list[str]:
        normalised: list[str] = []
        for url in urls:
            url = url.strip().rstrip("/")
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
            if url in normalised:
                raise ValueError(f"{url!r} is listed twice")
            normalised.append(url)
        return normalised


class StaticProvider:
    kind = "static"

    def __init__(self, pool: PoolConfig, context: ProviderContext) -> None:
        self.pool = pool.name
        self.urls = parse_pool_settings(StaticSettings, pool).urls
        self._held: dict[str, str] = {}  # url -> worker id

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._held.clear()

    @property
    def stops_with_control_plane(self) -> bool:
        return False

    async def create(self, worker_id: str) -> ProviderHandle:
        for url in self.urls:
            if url not in self._held:
                self._held[url] = worker_id
                return ProviderHandle(provider_id=url, endpoint=url)
        raise ProviderRejected(f"static pool {self.pool!r}: every configured URL already backs a worker")

    async def describe(self, provider_id: str) -> Instance:
        if provider_id not in self.urls:
            return Instance(provider_id, InstanceState.GONE, error="no longer in the pool's configured URLs")
        return Instance(
            provider_id, InstanceState.RUNNING, worker_id=self._held.get(provider_id), endpoint=provider_id
        )

    async def terminate(self, provider_id: str) -> None:
        # A static server is not ours to stop: forget which worker it backed.
        self._held.pop(provider_id, None)

    async def list_ours(self) -> list[Instance]:
        return [
            Instance(url, InstanceState.RUNNING, worker_id=self._held.get(url), endpoint=url)
            for url in self.urls
        ]

    def adopt(self, provider_id: str, worker_id: str) -> None:
        if provider_id in self.urls:
            self._held[provider_id] = worker_id
