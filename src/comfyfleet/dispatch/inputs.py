"""Task input files: fetched (base64, URL, or a file comfyfleet stores), uploaded to the chosen worker,
referenced from the graph.

Each task's files go to their own subfolder of the worker's input folder, so tasks that share a worker
never collide, and every string input of the graph equal to an input's name is rewritten to the uploaded
path (``LoadImage`` takes ``"<subfolder>/<name>"``).

A stored input (``"stored": {"folder", "key"}``: an uploaded Comfy API v2 asset) is read from the output store;
only a front door that checked the caller may use that file makes one, so a client-sent input naming
``stored`` is refused. URL fetches refuse loopback, private, link-local and other non-public addresses unless the config allows
them (``comfyfleet.net``), check every redirect hop the same way, and stop at a size cap.
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from comfyfleet.net import UnsafeAddress, pin_public_address
from comfyfleet.outputs import InvalidOutputName, OutputNotFound, OutputStore
from comfyfleet.redaction import redact

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\- ]{0,199}$")
_MAX_REDIRECTS = 5


class InputError(Exception):
    """An input that cannot be used: bad name, bad base64, forbidden or failing URL, too large."""


def stored_input(name: str, folder: str, key: str, *, size: int, asset_id: str) -> dict[str, Any]:
    """The ``inputs`` entry of a file the output store keeps under ``folder``/``key``."""
    return {"name": name, "stored": {"folder": folder, "key": key}, "size": size, "asset_id": asset_id}


def check_input_spec(spec: Any, *, max_bytes: int, allow_stored: bool = False) -> None:
    """Validate one entry of a task's ``inputs`` at submission time (no network). ``allow_stored``: the entry
    may name a stored file (never for what a client sent)."""
    if not isinstance(spec, dict):
        raise InputError("each input must be an object with 'name' and one of 'data' or 'url'")
    name = spec.get("name")
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise InputError(
            f"input name {name!r} must be a plain file name (letters, digits, '.', '_', '-', space; no '/')"
        )
    if "stored" in spec and not allow_stored:
        raise InputError(f"input {name!r}: unknown field 'stored'; an input has 'data' or 'url'")
    given = [kind for kind in ("data", "url", "stored") if kind in spec]
    if len(given) != 1:
        raise InputError(f"input {name!r} needs exactly one of 'data' (base64) or 'url'")
    if given == ["stored"]:
        stored = spec["stored"]
        if not (
            isinstance(stored, dict)
            and isinstance(stored.get("folder"), str)
            and isinstance(stored.get("key"), str)
        ):
            raise InputError(f"input {name!r}: 'stored' needs 'folder' and 'key'")
    elif given == ["data"]:
        decode_data(name, spec["data"], max_bytes=max_bytes)
    else:
        url = spec["url"]
        if (
            not isinstance(url, str)
            or urlsplit(url).scheme not in {"http", "https"}
            or not urlsplit(url).hostname
        ):
            raise InputError(f"input {name!r}: url must be an http(s) URL")


def decode_data(name: str, data: Any, *, max_bytes: int) -> bytes:
    if not isinstance(data, str):
        raise InputError(f"input {name!r}: 'data' must be a base64 string")
    if len(data) > max_bytes * 4 // 3 + 8:
        raise InputError(f"input {name!r} is larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"input {name!r}: 'data' is not valid base64") from exc
    if len(raw) > max_bytes:
        raise InputError(f"input {name!r} is larger than {max_bytes} bytes")
    return raw


async def fetch_url(client: httpx.AsyncClient, url: str, *, max_bytes: int, allow_private: bool) -> bytes:
    for _ in range(_MAX_REDIRECTS + 1):
        shown = redact(url)  # the message is kept on the task and logged: not the URL's token
        if urlsplit(url).scheme not in {"http", "https"}:
            raise InputError(f"input URL {shown!r} must be http(s)")
        try:
            target = await pin_public_address(url, allow_private=allow_private, label="input URL")
        except UnsafeAddress as exc:
            raise InputError(str(exc)) from exc
        try:
            async with client.stream(
                "GET",
                target.url,
                headers=target.headers,
                extensions=target.extensions,
                follow_redirects=False,
            ) as response:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise InputError(f"input URL {shown!r} redirected without a Location")
                    url = urljoin(url, location)
                    continue
                if response.status_code != 200:
                    raise InputError(f"input URL {shown!r} answered HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise InputError(f"input URL {shown!r} is larger than {max_bytes} bytes")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body.extend(chunk)
                    if len(body) > max_bytes:
                        raise InputError(f"input URL {shown!r} is larger than {max_bytes} bytes")
                return bytes(body)
        except httpx.HTTPError as exc:
            raise InputError(f"input URL {shown!r} could not be fetched: {redact(str(exc))}") from exc
    raise InputError(f"input URL followed more than {_MAX_REDIRECTS} redirects")


async def read_stored(outputs: OutputStore | None, name: str, stored: dict[str, str]) -> bytes:
    """The bytes of a stored input (its size was checked when it was stored)."""
    if outputs is None:
        raise InputError(f"input {name!r} is a stored file, but this dispatcher has no output store")
    body = bytearray()
    try:
        async for chunk in outputs.read(stored["folder"], stored["key"]):
            body.extend(chunk)
    except (OutputNotFound, InvalidOutputName) as exc:
        # Deleted since the submission (its asset was deleted). A storage outage is not the input's fault:
        # it goes up as OutputsUnavailable, and the attempt is retried.
        raise InputError(f"input {name!r} is no longer stored (its asset was deleted)") from exc
    return bytes(body)


def rewrite_graph(graph: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    """A copy of ``graph`` whose string inputs equal to an input name point at the uploaded path."""
    if not renames:
        return graph
    rewritten = copy.deepcopy(graph)
    for node in rewritten.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for key, value in inputs.items():
            if isinstance(value, str) and value in renames:
                inputs[key] = renames[value]
    return rewritten


Uploader = Callable[[bytes, str, str], Awaitable[dict[str, Any]]]


async def prepare_inputs(
    task_id: str,
    graph: dict[str, Any],
    inputs: list[dict[str, Any]] | None,
    upload: Uploader,
    *,
    http: httpx.AsyncClient,
    max_bytes: int,
    allow_private: bool,
    outputs: OutputStore | None = None,
) -> dict[str, Any]:
    """Upload every input of a task to the worker (``upload(data, name, subfolder)``); return the graph to submit.
    ``outputs``: where stored inputs are read from."""
    if not inputs:
        return graph
    subfolder = f"comfyfleet/{task_id}"
    renames: dict[str, str] = {}
    for spec in inputs:
        check_input_spec(spec, max_bytes=max_bytes, allow_stored=True)
        name = spec["name"]
        if "stored" in spec:
            data = await read_stored(outputs, name, spec["stored"])
        elif "data" in spec:
            data = decode_data(name, spec["data"], max_bytes=max_bytes)
        else:
            data = await fetch_url(http, spec["url"], max_bytes=max_bytes, allow_private=allow_private)
        uploaded = await upload(data, name, subfolder)
        stored_name = uploaded.get("name", name)
        stored_folder = uploaded.get("subfolder", subfolder)
        renames[name] = f"{stored_folder}/{stored_name}" if stored_folder else stored_name
    return rewrite_graph(graph, renames)
