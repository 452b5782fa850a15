"""Artifact storage for output files."""

from __future__ import annotations

import importlib
import re
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from comfyfleet.outputs.base import (
    SMALL_OUTPUT_BYTES,
    InvalidOutputName,
    OpenedOutput,
    OutputNotFound,
    OutputsError,
    OutputStore,
    OutputsUnavailable,
    StoredOutput,
    check_name,
)

# scheme -> "module:Class", imported only when chosen so boto3 loads only for S3.
BACKENDS: dict[str, str] = {
    "file": "comfyfleet.outputs.local:LocalOutputStore",
    "s3": "comfyfleet.outputs.s3:S3OutputStore",
}

# The query parameters an s3:// location may carry; everything else about S3 comes from the AWS chain.
S3_OPTIONS = frozenset({"endpoint_url", "region", "addressing_style"})

# What botocore itself accepts as a bucket name (S3 is stricter, some S3-compatible services are not).
_BUCKET = re.compile(r"^[A-Za-z0-9.\-_]{1,255}$")


def open_outputs(location: str) -> OutputStore:
    """A directory path (or ``file://`` URL) gives local storage; ``s3://bucket/optional/prefix`` an S3 bucket,
    with ``?endpoint_url=…&region=…&addressing_style=path|virtual|auto`` for S3-compatible services."""
    scheme = location.split("://", 1)[0].lower() if "://" in location else "file"
    target = BACKENDS.get(scheme)
    if target is None:
        valid = ", ".join(f"{name}://" for name in sorted(BACKENDS))
        raise OutputsError(f"unknown outputs location {location!r}: use a directory or one of {valid}")
    if scheme == "file":
        args: tuple[Any, ...] = (location.split("://", 1)[1] if "://" in location else location,)
        options: dict[str, Any] = {}
    else:
        args, options = _bucket_location(location)
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # The backend's own message names the extra to install.
        raise OutputsError(f"cannot use outputs location {location!r}: {exc}") from exc
    store: OutputStore = getattr(module, class_name)(*args, **options)
    return store


def _bucket_location(location: str) -> tuple[tuple[str, str], dict[str, str]]:
    """``s3://bucket/prefix?option=value`` → ``(bucket, prefix)`` and the options, or a clear error."""
    usage = "use s3://BUCKET/optional/prefix?endpoint_url=…&region=…"
    parts = urlsplit(location)
    if "@" in parts.netloc:
        raise OutputsError(
            f"outputs location {_without_userinfo(location)!r} holds credentials: set them through the AWS "
            "environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or ~/.aws instead"
        )
    bucket = parts.netloc
    if not bucket:
        raise OutputsError(f"outputs location {location!r} names no bucket: {usage}")
    if not _BUCKET.match(bucket):
        raise OutputsError(f"outputs location {location!r}: {bucket!r} is not a valid bucket name")
    if parts.fragment:
        raise OutputsError(f"outputs location {location!r} has a '#' part: {usage}")
    prefix = unquote(parts.path)
    if any(segment in {".", ".."} for segment in prefix.split("/")):
        raise OutputsError(f"outputs location {location!r}: the prefix may not hold '.' or '..' segments")
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        pairs = [("", "")]
    for name, value in pairs:
        if name not in S3_OPTIONS:
            valid = ", ".join(sorted(S3_OPTIONS))
            raise OutputsError(f"outputs location {location!r}: unknown option {name!r} (valid: {valid})")
        if name in options:
            raise OutputsError(f"outputs location {location!r}: {name} is given twice")
        if not value:
            raise OutputsError(f"outputs location {location!r}: {name} is empty")
        options[name] = value
    endpoint = options.get("endpoint_url")
    if endpoint is not None:
        endpoint_parts = urlsplit(endpoint)
        try:
            usable = endpoint_parts.scheme in {"http", "https"} and bool(endpoint_parts.hostname)
            endpoint_parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            usable = False
        if not usable:
            raise OutputsError(
                f"outputs location {location!r}: endpoint_url must be an http:// or https:// URL"
            )
    return (bucket, prefix), options


def _without_userinfo(location: str) -> str:
    parts = urlsplit(location)
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


__all__ = [
    "BACKENDS",
    "SMALL_OUTPUT_BYTES",
    "InvalidOutputName",
    "OpenedOutput",
    "OutputNotFound",
    "OutputStore",
    "OutputsError",
    "OutputsUnavailable",
    "StoredOutput",
    "check_name",
    "open_outputs",
]
