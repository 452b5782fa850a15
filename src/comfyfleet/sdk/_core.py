"""What the synchronous and the asynchronous client share: where the server is, how requests are built
and how answers (and server-sent events) are read. No I/O here."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from comfyfleet.sdk.errors import ComfyfleetError, InputFileError, ServerUnreachable, api_error
from comfyfleet.sdk.models import Task, TaskEvent, TaskPage

DEFAULT_URL = "http://127.0.0.1:8080"
USER_AGENT = "comfyfleet-sdk"

InputFiles = Mapping[str, "bytes | str | os.PathLike[str]"] | Sequence[Mapping[str, Any]]


class ConfigFileError(ComfyfleetError):
    """The client config file exists but cannot be used."""


def client_config_path() -> Path:
    """``$COMFYFLEET_CLIENT_CONFIG``, else ``$XDG_CONFIG_HOME/comfyfleet/client.yaml`` (``~/.config/…``)."""
    explicit = os.environ.get("COMFYFLEET_CLIENT_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "comfyfleet" / "client.yaml"


def _read_client_config() -> dict[str, Any]:
    path = client_config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigFileError(f"cannot read the client config {path}: {exc.strerror or exc}") from exc
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"the client config {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"the client config {path} must be a mapping with 'url' and 'api_key'")
    return data


def resolve_connection(url: str | None, api_key: str | None) -> tuple[str, str | None]:
    """Server URL and API key: the arguments, else ``COMFYFLEET_URL`` / ``COMFYFLEET_API_KEY``, else the
    client config file, else ``http://127.0.0.1:8080`` and no key."""
    url = url or os.environ.get("COMFYFLEET_URL") or None
    api_key = api_key or os.environ.get("COMFYFLEET_API_KEY") or None
    if url is None or api_key is None:
        config = _read_client_config()
        url = url or (str(config["url"]) if config.get("url") else None)
        api_key = api_key or (str(config["api_key"]) if config.get("api_key") else None)
    url = (url or DEFAULT_URL).rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url, api_key


def default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def describe_transport_error(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "the connection timed out"
    if isinstance(exc, httpx.TimeoutException):
        return "the server did not answer in time"
    if isinstance(exc, httpx.ConnectError):
        reason = str(exc) or "connection failed"
        if "refused" in reason.lower() or "errno 111" in reason.lower():
            return "connection refused (is 'comfyfleet serve' running there?)"
        return reason
    return str(exc) or type(exc).__name__


def unreachable(url: str, exc: httpx.TransportError) -> ServerUnreachable:
    return ServerUnreachable(url, describe_transport_error(exc))


def decode(response: httpx.Response) -> Any:
    """The JSON of a successful answer; the typed :class:`~comfyfleet.sdk.errors.ApiError` otherwise."""
    try:
        body = response.json() if response.content else None
    except ValueError:
        body = None
    if response.is_success:
        return body
    raise api_error(response.status_code, body, f"HTTP {response.status_code} {response.reason_phrase}")


def task_path(task_id: str) -> str:
    return f"/api/v1/tasks/{quote(str(task_id), safe='')}"


def encode_inputs(inputs: InputFiles | None) -> list[dict[str, Any]] | None:
    """``{"cat.png": Path(...) | bytes | "https://…"}`` (or the API's own list) → the API's ``inputs``."""
    if inputs is None:
        return None
    if isinstance(inputs, Mapping):
        encoded: list[dict[str, Any]] = []
        for name, source in inputs.items():
            if isinstance(source, bytes):
                data = source
            elif isinstance(source, str) and source.startswith(("http://", "https://")):
                encoded.append({"name": str(name), "url": source})
                continue
            else:
                data = _read_input_file(str(name), source)
            encoded.append({"name": str(name), "data": base64.b64encode(data).decode("ascii")})
        return encoded
    return [dict(entry) for entry in inputs]


def _read_input_file(name: str, source: str | os.PathLike[str]) -> bytes:
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise InputFileError(name, os.fspath(source), exc.strerror or str(exc)) from exc


def submission(
    workflow: Mapping[str, Any],
    *,
    priority: int,
    workflow_id: str | None,
    pool: str | None,
    inputs: InputFiles | None,
    webhook: str | Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    max_retries: int | None,
    timeout_s: float | None,
    models: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"payload": dict(workflow), "priority": priority}
    optional: dict[str, Any] = {
        "workflow_id": workflow_id,
        "pool": pool,
        "inputs": encode_inputs(inputs),
        "models": [dict(spec) for spec in models] if models is not None else None,
        "webhook": {"url": webhook} if isinstance(webhook, str) else (dict(webhook) if webhook else None),
        "metadata": dict(metadata) if metadata is not None else None,
        "max_retries": max_retries,
        "timeout_s": float(timeout_s) if timeout_s is not None else None,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    return body


def list_params(
    status: str | Sequence[str] | None,
    workflow_id: str | None,
    limit: int,
    cursor: str | None,
    include_payload: bool = False,
) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if include_payload:
        params["include"] = "payload"
    if status:
        params["status"] = status if isinstance(status, str) else ",".join(status)
    if workflow_id:
        params["workflow_id"] = workflow_id
    if cursor:
        params["cursor"] = cursor
    return params


def task_page(body: Any) -> TaskPage:
    tasks = body.get("tasks", []) if isinstance(body, dict) else []
    return TaskPage(
        [Task.from_json(task) for task in tasks], body.get("next_cursor") if isinstance(body, dict) else None
    )


def output_target(directory: Path, filename: str) -> Path:
    # Only the last component: a server must not be able to write outside the chosen directory.
    name = Path(filename.replace("\\", "/")).name or "output"
    return directory / name


class SSEDecoder:
    """Server-sent events, fed line by line (without line endings)."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> TaskEvent | None:
        if not line:
            if not self._data:
                self._event = "message"
                return None
            event, data = self._event, "\n".join(self._data)
            self._event, self._data = "message", []
            return parse_event(event, data)
        if line.startswith(":"):
            return None  # a comment: the server's keep-alive ping
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def parse_event(event: str, data: str) -> TaskEvent | None:
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    if event == "snapshot":
        return TaskEvent("snapshot", payload, Task.from_json(payload))
    return TaskEvent(event, payload)
