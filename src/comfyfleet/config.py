"""One typed settings object, resolved once at start-up.

Precedence: explicit argument (CLI flag) > environment (``COMFYFLEET_…``, nested with ``__``) >
config file (YAML, ``--config`` / ``COMFYFLEET_CONFIG``) > default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from comfyfleet.domain.graph import validate_graph
from comfyfleet.models.spec import DEFAULT_MODEL_FOLDERS, ModelPolicy, ModelRejected, ModelSpec

__all__ = ["DEFAULT_MODEL_FOLDERS"]  # Comfy API v2's model uploads use ComfyUI's folders too


class ConfigError(Exception):
    """The configuration is invalid; the message says what to fix."""


def hash_api_key(key: str) -> str:
    """How API keys are stored in the config: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class ApiKey(BaseModel):
    """One API key. Give ``key_hash`` (``sha256:<hex>``, see ``comfyfleet hash-key``) or, for tests
    and demos, the plain ``key`` (hashed on load and never kept)."""

    key_hash: str = ""
    key: str | None = Field(default=None, exclude=True, repr=False)
    tenant: str = "default"
    admin: bool = False

    @model_validator(mode="after")
    def _hash_plain_key(self) -> ApiKey:
        if self.key:
            self.key_hash = hash_api_key(self.key)
            self.key = None
        if not self.key_hash.startswith("sha256:"):
            raise ValueError("api key needs key_hash 'sha256:<hex>' or a plain 'key'")
        return self


class PoolConfig(BaseModel):
    """A named group of workers from one provider with one spec and one scaling policy."""

    name: str
    provider: Literal["static", "process", "docker", "novita"] = "static"
    min_workers: int = Field(default=0, ge=0)
    max_workers: int = Field(default=1, ge=0)
    idle_timeout_s: float = Field(default=300.0, ge=0)
    startup_timeout_s: float = Field(default=600.0, gt=0)
    prefetch: int = Field(default=1, ge=0)
    scale_up_cooldown_s: float = Field(default=0.0, ge=0)
    scale_down_cooldown_s: float = Field(default=0.0, ge=0)
    labels: list[str] = Field(default_factory=list)
    # Replace a worker once it has been given this many tasks (0 = never): a cure for memory that creeps up over
    # a long-running ComfyUI. Not for static pools, whose servers comfyfleet cannot restart.
    recycle_after_tasks: int = Field(default=0, ge=0)
    # An API-format graph (inline, or the path of a JSON file) run on each new worker before it takes tasks,
    # so that its models are loaded when the first task arrives.
    warmup: dict[str, Any] | None = None
    # Provider-specific settings (urls, command, image, product…); each provider validates its own.
    settings: dict[str, Any] = Field(default_factory=dict)
    # The pool's model manifest: every worker has these files in its models folder before it becomes ready
    # (docs/models.md). Pickle formats and URLs to non-public hosts only where the pool allows them, for the
    # manifest and for the models tasks sent to this pool bring.
    models: list[ModelSpec] = Field(default_factory=list)
    allow_pickle_models: bool = False
    models_allow_private: bool = False

    @property
    def model_policy(self) -> ModelPolicy:
        return ModelPolicy(allow_pickle=self.allow_pickle_models, allow_private=self.models_allow_private)

    @field_validator("warmup", mode="before")
    @classmethod
    def _read_warmup_file(cls, value: Any) -> Any:
        if not isinstance(value, str | Path):
            return value
        try:
            value = json.loads(Path(value).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read warm-up workflow {value}: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"warm-up workflow {value} is not valid JSON: {exc}") from None
        if isinstance(value, dict) and isinstance(value.get("prompt"), dict):
            return value["prompt"]  # a saved POST /prompt body
        return value

    @field_validator("warmup")
    @classmethod
    def _check_warmup(cls, graph: dict[str, Any] | None) -> dict[str, Any] | None:
        if graph is not None and (errors := validate_graph(graph)):
            problems = "; ".join(error.message for error in errors[:3])
            raise ValueError(
                f"warm-up workflow is not an API-format graph (export it with 'Export (API)'): {problems}"
            )
        return graph

    @model_validator(mode="after")
    def _bounds(self) -> PoolConfig:
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"pool {self.name!r}: min_workers {self.min_workers} > max_workers {self.max_workers}"
            )
        for index, spec in enumerate(self.models):
            try:
                self.model_policy.check_format(spec, index)
            except ModelRejected as exc:
                raise ValueError(f"pool {self.name!r}: models[{index}]: {exc}") from None
        return self


class Limits(BaseModel):
    max_body_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_nodes: int = Field(default=2000, gt=0)
    max_priority: int = 1_000_000
    min_priority: int = -1_000_000
    max_input_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    max_page_bytes: int = Field(default=8 * 1024 * 1024, gt=0)


class DispatchSettings(BaseModel):
    lease_s: float = Field(default=30.0, gt=0)
    default_timeout_s: float = Field(default=1800.0, gt=0)
    default_max_retries: int = Field(default=3, ge=0)
    retry_base_s: float = Field(default=1.0, ge=0)
    retry_max_s: float = Field(default=300.0, ge=0)
    interrupt_grace_s: float = Field(default=30.0, ge=0)
    retry_timeouts: bool = False  # a timed-out task is failed unless this is set
    safety_poll_s: float = Field(default=5.0, gt=0)
    placement: bool = True
    fair_share: bool = False  # tenants take turns within a priority instead of first come, first served
    allow_private_input_urls: bool = False


class FleetSettings(BaseModel):
    """The worker manager: health probes, the autoscaler's reconciler and the reaper (see docs/providers.md)."""

    namespace: str = Field(default="comfyfleet", pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")  # labels / name prefix
    probe_interval_s: float = Field(default=5.0, gt=0)
    probe_timeout_s: float = Field(default=5.0, gt=0)
    failure_threshold: int = Field(default=3, ge=1)
    reconcile_interval_s: float = Field(default=2.0, gt=0)
    reap_interval_s: float = Field(default=60.0, gt=0)
    start_backoff_base_s: float = Field(default=5.0, ge=0)
    start_backoff_max_s: float = Field(default=300.0, ge=0)
    tasks_per_worker: int = Field(default=1, ge=1)
    keep_terminated_s: float = Field(default=3600.0, ge=0)
    default_pool: str | None = None  # the pool that tasks without a pool scale; first dynamic pool if unset


class WebhookSettings(BaseModel):
    """Deliveries of task webhooks (see docs/webhooks.md). The signing secret is ``webhook_secret``."""

    max_attempts: int = Field(default=8, ge=1, le=100)
    retry_base_s: float = Field(default=5.0, ge=0)  # first back-off; doubles per attempt, with jitter
    retry_max_s: float = Field(default=3600.0, ge=0)
    timeout_s: float = Field(default=10.0, gt=0)  # one POST, connect to last byte
    concurrency: int = Field(default=16, ge=1)
    safety_poll_s: float = Field(default=5.0, gt=0)


class ModelSettings(BaseModel):
    """The host's model cache (docs/models.md): one verified copy of each file, linked into workers' folders."""

    cache_dir: str = "./comfyfleet-models/cache"  # <cache_dir>/sha256/<ab>/<sha256>
    workers_dir: str = "./comfyfleet-models/workers"  # <workers_dir>/<worker_id>/models/<folder>/<name>
    cache_budget_bytes: int = Field(default=200 * 1024**3, gt=0)  # least recently used files go beyond it
    max_file_bytes: int = Field(default=64 * 1024**3, gt=0)  # one download
    fetch_attempts: int = Field(default=5, ge=1)  # tries of one download on transient errors (each resumes)
    fetch_timeout_s: float = Field(default=60.0, gt=0)  # without a byte from the source
    fetch_retry_base_s: float = Field(default=1.0, ge=0)  # first back-off between tries; doubles, with jitter


class ApiV2Settings(BaseModel):
    """Comfy API v2 (``/api/v2``, see docs/comfy-api-v2.md)."""

    max_upload_bytes: int = Field(default=100 * 1024 * 1024, gt=0)  # one asset upload
    max_event_streams: int = Field(default=16, ge=1)  # open /events streams per tenant and replica
    model_folders: list[str] = Field(default_factory=lambda: list(DEFAULT_MODEL_FOLDERS))

    @field_validator("model_folders")
    @classmethod
    def _plain_folder_names(cls, folders: list[str]) -> list[str]:
        for folder in folders:
            if not folder or folder in {".", ".."} or "/" in folder or "\\" in folder:
                raise ValueError(f"model folder {folder!r} must be one plain folder name")
        return folders


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COMFYFLEET_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    store: str = "sqlite:///comfyfleet.db"
    config: Path | None = None
    outputs: str = "./comfyfleet-outputs"
    workers: Annotated[list[str], NoDecode] = Field(
        default_factory=list
    )  # static ComfyUI URLs (the "default" static pool)
    pools: list[PoolConfig] = Field(default_factory=list)
    api_keys: list[ApiKey] = Field(default_factory=list)
    webhook_secret: str | None = None  # "whsec_<base64>", signs webhooks (Standard Webhooks)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    limits: Limits = Field(default_factory=Limits)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    fleet: FleetSettings = Field(default_factory=FleetSettings)
    apiv2: ApiV2Settings = Field(default_factory=ApiV2Settings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    replica_id: str | None = None
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"

    @field_validator("workers", mode="before")
    @classmethod
    def _split_workers(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.replace(",", " ").split()]
        return value

    @field_validator("workers")
    @classmethod
    def _check_worker_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            parts = urlsplit(url)
            try:
                parts.port  # noqa: B018 - raises on a port that is not a number
            except ValueError:
                raise ValueError(f"worker URL {url!r} has an invalid port") from None
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ValueError(f"worker URL {url!r} must look like http://host:8188")
        return urls

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: str | None) -> str | None:
        if value is None:
            return value
        import base64
        import binascii

        body = value.removeprefix("whsec_")
        try:
            key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) < 16:
            raise ValueError(
                "webhook_secret must be 'whsec_' followed by base64 of at least 16 random bytes, "
                "e.g. whsec_$(head -c 32 /dev/urandom | base64)"
            )
        return value

    @model_validator(mode="after")
    def _unique_pools(self) -> Settings:
        names = [pool.name for pool in self.pools]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"pool names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlFileSource(settings_cls, init_settings, env_settings))


class _YamlFileSource(PydanticBaseSettingsSource):
    """The config file named by the ``config`` argument or ``COMFYFLEET_CONFIG``."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
    ) -> None:
        super().__init__(settings_cls)
        self._init = init_settings
        self._env = env_settings

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = self._init().get("config") or self._env().get("config")
        if not path:
            return {}
        return load_config_file(Path(path))


def load_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings at the top level")
    base = path.parent
    # Relative paths in the file are relative to the file, not to the working directory (URLs such as
    # s3://bucket are left alone).
    for key in ("outputs",):
        if isinstance(data.get(key), str) and "://" not in data[key] and not Path(data[key]).is_absolute():
            data[key] = str(base / data[key])
    for pool in data.get("pools") or []:
        if (
            isinstance(pool, dict)
            and isinstance(pool.get("warmup"), str)
            and not Path(pool["warmup"]).is_absolute()
        ):
            pool["warmup"] = str(base / pool["warmup"])
    models = data.get("models")
    if isinstance(models, dict):
        for key in ("cache_dir", "workers_dir"):
            if isinstance(models.get(key), str) and not Path(models[key]).is_absolute():
                models[key] = str(base / models[key])
    store = data.get("store")
    if isinstance(store, str) and store.startswith("sqlite:///") and not store.startswith("sqlite:////"):
        data["store"] = "sqlite:///" + str(base / store.removeprefix("sqlite:///"))
    return data


def load_settings(**overrides: Any) -> Settings:
    """Resolve settings once; ``overrides`` are explicit arguments (``None`` values are ignored)."""
    explicit = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**explicit)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc
    except SettingsError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
