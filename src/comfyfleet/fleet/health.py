"""Health probes: a worker is ready only when its ComfyUI answers ``/system_stats``.

:class:`HealthProber` keeps one pooled HTTP client for every probe of the fleet; it uses plain httpx
rather than a per-worker ``ComfyClient`` because a probe must not open the worker's event WebSocket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

import httpx

from comfyfleet.fleet.errors import FleetClosed


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    system_stats: dict[str, Any] | None = None
    error: str | None = None


class HealthProber:
    def __init__(self, *, timeout_s: float = 5.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._timeout_s = timeout_s
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self._timeout_s),
            transport=self._transport,
            limits=httpx.Limits(max_keepalive_connections=64, keepalive_expiry=30.0),
            follow_redirects=False,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise FleetClosed("the health prober is not open")
        return self._client

    async def probe(self, endpoint: str) -> ProbeResult:
        """GET ``/system_stats``: ok only for a 200 with a JSON object carrying ``system``."""
        try:
            response = await self._http().get(endpoint.rstrip("/") + "/system_stats")
        except httpx.HTTPError as exc:
            return ProbeResult(
                False, error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            )
        if response.status_code != 200:
            return ProbeResult(False, error=f"/system_stats answered HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            return ProbeResult(False, error="/system_stats did not answer JSON")
        if not isinstance(body, dict) or "system" not in body:
            return ProbeResult(False, error="/system_stats answer is not ComfyUI's (no 'system')")
        return ProbeResult(True, system_stats=body)

    async def node_types(self, endpoint: str) -> list[str] | None:
        """The node types the worker offers (``/object_info`` keys); None when it cannot be read now."""
        try:
            response = await self._http().get(
                endpoint.rstrip("/") + "/object_info", timeout=max(self._timeout_s, 30.0)
            )
            if response.status_code != 200:
                return None
            body = response.json()
        except (httpx.HTTPError, ValueError):
            return None
        return sorted(body) if isinstance(body, dict) else None
