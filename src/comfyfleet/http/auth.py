"""API keys: ``Authorization: Bearer <key>`` on every ``/api/v1`` route (and the gateway, the dashboard)
when keys are configured.

Keys are kept only as ``sha256:<hex>`` hashes; a presented key is hashed and compared with every
configured hash in constant time. Each key belongs to a tenant, which sees and cancels only its own
tasks; an admin key sees every tenant's. With no keys configured the API is open and every request acts
as tenant ``default`` with an administrator's view (there is nobody to hide tasks from).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from starlette.requests import HTTPConnection

from comfyfleet.config import ApiKey, hash_api_key
from comfyfleet.http.errors import Unauthorized

DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant new tasks belong to, and whether it may see every tenant's tasks."""

    tenant: str
    admin: bool

    @property
    def visible_tenant(self) -> str | None:
        """The tenant filter for store reads (None = all tenants)."""
        return None if self.admin else self.tenant


OPEN_ACCESS = Principal(tenant=DEFAULT_TENANT, admin=True)


class KeyRing:
    """The configured API keys, matched without revealing through timing which one (or how much) matched."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = [(key.key_hash.encode(), Principal(key.tenant, key.admin)) for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def principal_for(self, authorization: str | None) -> Principal:
        if not self._keys:
            return OPEN_ACCESS
        if not authorization:
            raise Unauthorized("unauthorized", "this API needs an API key: send Authorization: Bearer <key>")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("unauthorized", "the Authorization header must be 'Bearer <key>'")
        presented = hash_api_key(token).encode()
        found: Principal | None = None
        for key_hash, principal in self._keys:
            # Compare against every key, not stopping at the first match, so timing says nothing.
            if hmac.compare_digest(presented, key_hash) and found is None:
                found = principal
        if found is None:
            raise Unauthorized("invalid_api_key", "the API key is not valid")
        return found


# The dashboard keeps its key in this cookie (HttpOnly, SameSite=Strict). A request that changes something
# and is authenticated only by the cookie must also carry DASHBOARD_HEADER: a page of another site cannot
# add a custom header without CORS permission, so it cannot make the browser act with the cookie (CSRF).
DASHBOARD_COOKIE = "comfyfleet_key"
DASHBOARD_HEADER = "x-comfyfleet-dashboard"


def principal_from(connection: HTTPConnection, keyring: KeyRing) -> Principal:
    """The caller of a request or WebSocket: ``Authorization: Bearer <key>``, else the dashboard's cookie."""
    authorization = connection.headers.get("authorization")
    if authorization is None and keyring.enabled:
        cookie = connection.cookies.get(DASHBOARD_COOKIE)
        if cookie:
            method = connection.scope.get("method", "GET")
            if method not in ("GET", "HEAD") and connection.headers.get(DASHBOARD_HEADER) != "1":
                raise Unauthorized(
                    "unauthorized",
                    f"a change made with the dashboard's cookie needs the {DASHBOARD_HEADER} header",
                )
            authorization = f"Bearer {cookie}"
    return keyring.principal_for(authorization)
