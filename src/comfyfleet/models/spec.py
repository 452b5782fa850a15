"""What a model file is to comfyfleet: ``{url, sha256, folder, name}`` and the rules a pool sets for them.

A spec names where the bytes come from (``https://…``, ``s3://bucket/key`` or ``asset://<sha256>`` for a model
uploaded through Comfy API v2), the sha256 they must have (nothing unverified ever reaches a worker), and where
ComfyUI finds the file (``models/<folder>/<name>``). Pickle-based formats can run code when loaded, so only
safe formats pass unless a pool allows pickles; URLs to loopback, private or link-local hosts are refused
unless a pool allows them (``comfyfleet.net`` decides what is public).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# ComfyUI's model folders comfyfleet may put files in (``models/<folder>/<name>``). Not ``configs``
# (arbitrary YAML) nor ``custom_nodes`` (arbitrary Python), though ComfyUI has folders of those names.
DEFAULT_MODEL_FOLDERS = [
    "checkpoints",
    "clip",
    "clip_vision",
    "controlnet",
    "diffusion_models",
    "embeddings",
    "gligen",
    "hypernetworks",
    "loras",
    "model_patches",
    "photomaker",
    "style_models",
    "text_encoders",
    "unet",
    "upscale_models",
    "vae",
    "vae_approx",
]
SAFE_SUFFIXES = (".safetensors", ".sft", ".gguf")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SOURCE_SCHEMES = ("http", "https", "s3", "asset")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-+ ]{0,199}$")


class ModelsError(Exception):
    """Root of the models package's errors."""


class ModelRejected(ModelsError):
    """A spec that can never be fetched as given (bad hash, format, folder, name or address): fix the request.
    ``index``: the position of the spec at fault in the list checked, when there was a list."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class ModelUnavailable(ModelsError):
    """The file could not be had, for good: 404, wrong sha256, too large, refused address. Not retried."""


class ModelFetchExhausted(ModelUnavailable):
    """Transient failures outlasted the retries: the task fails, but what was fetched is kept for a resume."""


class ModelFetchError(ModelsError):
    """A transient failure (connection cut, 5xx, timeout): the download is retried, resuming where it stopped."""


class ModelSpec(BaseModel):
    """One model file a pool or a task needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(
        description="Where the bytes come from: an http(s) URL, s3://bucket/key, or asset://<sha256> for a model "
        "file uploaded through Comfy API v2.",
        examples=["https://example.com/models/sdxl-base.safetensors"],
    )
    sha256: str = Field(
        description="The file's sha256 (hex); the bytes are verified before a worker sees them."
    )
    folder: str = Field(description="ComfyUI's model folder: checkpoints, loras, vae, …", examples=["loras"])
    name: str = Field(
        default="",
        description="The file name in that folder; defaults to the URL's file name. A plain name, no path.",
    )

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.strip().lower().removeprefix("sha256:")
        if not _SHA256.match(value):
            raise ValueError("sha256 must be 64 hexadecimal digits")
        return value

    @field_validator("folder")
    @classmethod
    def _known_folder(cls, value: str) -> str:
        if value not in DEFAULT_MODEL_FOLDERS:
            raise ValueError(
                f"folder {value!r} is not a ComfyUI model folder; use one of {', '.join(DEFAULT_MODEL_FOLDERS)}"
            )
        return value

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in SOURCE_SCHEMES:
            raise ValueError("url must be http(s)://, s3://bucket/key or asset://<sha256>")
        if not parts.hostname and parts.scheme != "asset":
            raise ValueError(f"url {value!r} has no host")
        return value

    @model_validator(mode="after")
    def _plain_name(self) -> ModelSpec:
        name = self.name or _file_name(self.url)
        if self.url.startswith("asset://") and not self.name:
            raise ValueError("a model asset needs a 'name' (the file name in its folder)")
        if not _PLAIN_NAME.match(name) or ".." in name:
            raise ValueError(f"model name {name!r} must be a plain file name (no '/', no '..')")
        if not name.lower().endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES):
            formats = ", ".join(SAFE_SUFFIXES + PICKLE_SUFFIXES)
            raise ValueError(f"model name {name!r} must end in one of {formats}")
        if self.url.startswith("asset://") and self.url.removeprefix("asset://").lower() != self.sha256:
            raise ValueError("asset://<sha256> must name the same sha256 as the spec")
        object.__setattr__(self, "name", name)
        return self

    @property
    def pickled(self) -> bool:
        """A pickle-based format: loading it may run code, so pools must opt in."""
        return self.name.lower().endswith(PICKLE_SUFFIXES)

    @property
    def path(self) -> str:
        """Where ComfyUI finds it, relative to its ``models`` folder."""
        return f"{self.folder}/{self.name}"


def _file_name(url: str) -> str:
    return unquote(PurePosixPath(urlsplit(url).path).name)


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    """What a pool allows of model files: pickle formats, and URLs to non-public hosts (loopback test
    servers, a mirror on the LAN)."""

    allow_pickle: bool = False
    allow_private: bool = False

    def check_format(self, spec: ModelSpec, index: int | None = None) -> None:
        if spec.pickled and not self.allow_pickle:
            raise ModelRejected(
                f"model {spec.path}: pickle formats ({', '.join(PICKLE_SUFFIXES)}) can run code when loaded; "
                f"use {', '.join(SAFE_SUFFIXES)} or set allow_pickle_models on the pool",
                index,
            )

    @classmethod
    def strictest(cls, policies: list[ModelPolicy]) -> ModelPolicy:
        """What every one of ``policies`` allows (a task that may land in any of several pools)."""
        if not policies:
            return cls()
        return cls(
            allow_pickle=all(policy.allow_pickle for policy in policies),
            allow_private=all(policy.allow_private for policy in policies),
        )


def parse_specs(raw: Any) -> list[ModelSpec]:
    """A submission's ``models`` list as specs; :class:`ModelRejected` with the position of the first bad one."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ModelRejected("models must be a list of {url, sha256, folder, name}")
    specs = []
    for index, item in enumerate(raw):
        try:
            specs.append(ModelSpec.model_validate(item))
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            message = str(problem["msg"]).removeprefix("Value error, ")
            raise ModelRejected(f"models[{index}]{'.' + where if where else ''}: {message}", index) from None
    return specs
