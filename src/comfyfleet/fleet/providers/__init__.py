"""Providers, picked by a pool's ``provider`` name through a lazy table so an SDK loads only when chosen."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from comfyfleet.fleet.errors import FleetConfigError, ProviderNotInstalled
from comfyfleet.fleet.providers.base import Instance, InstanceState, Provider, ProviderHandle

if TYPE_CHECKING:
    from comfyfleet.config import PoolConfig

# name -> "module:Class"; a provider module is imported only when a pool uses it.
PROVIDERS: dict[str, str] = {
    "static": "comfyfleet.fleet.providers.static:StaticProvider",
    "process": "comfyfleet.fleet.providers.process:ProcessProvider",
    "docker": "comfyfleet.fleet.providers.docker:DockerProvider",
    "novita": "comfyfleet.fleet.providers.novita:NovitaProvider",
}

_EXTRAS = {"docker": "docker"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderContext:
    """What every provider gets besides its pool. ``installation`` (the store's ``installation_id``) is stamped
    on every instance the provider creates, and ``list_ours`` answers only instances carrying it; ``namespace``
    goes in labels and names too; ``state_dir`` is where to keep files; ``workers_dir`` is where each worker's
    own folder is made (its models folder and ``extra_model_paths.yaml``, see ``comfyfleet.models.links``);
    ``cache_dir`` is the host's model cache (mounted into containers); ``worker_token`` makes the token a
    worker's companion pulls model files with (None without a model service)."""

    installation: str
    namespace: str = "comfyfleet"
    state_dir: Path = Path("comfyfleet-workers")
    workers_dir: Path = Path("comfyfleet-models/workers")
    cache_dir: Path = Path("comfyfleet-models/cache")
    worker_token: Callable[[str], str] | None = None


def build_provider(pool: PoolConfig, context: ProviderContext) -> Provider:
    """The (not yet entered) provider for ``pool``; raises :class:`FleetConfigError` for a bad pool."""
    target = PROVIDERS.get(pool.provider)
    if target is None:
        valid = ", ".join(sorted(PROVIDERS))
        raise FleetConfigError(f"pool {pool.name!r}: unknown provider {pool.provider!r}; use one of {valid}")
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = _EXTRAS.get(pool.provider)
        if extra is None:
            raise
        raise ProviderNotInstalled(
            f"pool {pool.name!r} uses the {pool.provider} provider, which needs an extra: "
            f"pip install 'comfyfleet[{extra}]' ({exc})"
        ) from exc
    provider: Provider = getattr(module, class_name)(pool, context)
    return provider


__all__ = [
    "PROVIDERS",
    "Instance",
    "InstanceState",
    "Provider",
    "ProviderContext",
    "ProviderHandle",
    "build_provider",
]
