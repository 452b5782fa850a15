"""What the emulator's route modules share: upstream's bare 500, JSON bodies, the origin guard."""

from __future__ import annotations

import json
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from ipaddress import ip_address
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Route = tuple[str, str, Handler]


def server_error() -> web.Response:
    """What aiohttp answers when a ComfyUI handler raises (bad JSON and friends)."""
    return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")


async def json_body(request: web.Request) -> Any:
    """The parsed body; raises ValueError for a body that is not JSON (upstream's handlers then 500)."""
    return json.loads(await request.text())


def canonical_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


@web.middleware
async def origin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Upstream's only guard: cross-site requests to a loopback server get 403."""
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        return web.Response(status=403)
    if "Host" in request.headers and "Origin" in request.headers:
        host_domain = request.headers["Host"].lower()
        origin_domain = urllib.parse.urlparse(request.headers["Origin"]).netloc.lower()
        if _is_loopback(urllib.parse.urlsplit("//" + host_domain).hostname) and host_domain != origin_domain:
            return web.Response(status=403)
    return await handler(request)
