"""Requests to addresses that users name (input file URLs, webhook URLs) must not reach inside the network.

:func:`pin_public_address` resolves a URL's host once, refuses it when any of its addresses is loopback,
private, link-local or otherwise not public, and pins the request to the address it checked, so that a name
that resolves elsewhere a moment later (DNS rebinding) cannot redirect it. Shared by the dispatcher (input
files) and the webhook deliverer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from comfyfleet.redaction import redact


class UnsafeAddress(Exception):
    """The URL has no host, its host does not resolve, or it resolves to an address that is not public."""


def is_public_address(address: str) -> bool:
    """Whether an IP address (v4 or v6, including v4-mapped v6) is a public unicast address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True, slots=True)
class PinnedTarget:
    """Where to send a request so that it reaches the address that was checked, not whatever the name
    resolves to a moment later (DNS rebinding): the URL with its host replaced by that address, the
    ``Host`` header and, for HTTPS, the name to verify the certificate against."""

    url: str
    headers: dict[str, str]
    extensions: dict[str, Any]


async def pin_public_address(
    url: str,
    *,
    allow_private: bool,
    label: str = "URL",
    hint: str = "set dispatch.allow_private_input_urls to allow it",
) -> PinnedTarget:
    """Resolve ``url``'s host once, refuse it (:class:`UnsafeAddress`) when any address is loopback, private,
    link-local or otherwise not public (unless ``allow_private``), and pin the request to the checked
    address. ``label`` names the URL in messages ("input URL", "webhook URL"), ``hint`` says which setting
    allows it."""
    parts = urlsplit(url)
    host = parts.hostname
    shown = redact(url)  # messages are kept on the task and logged: not the URL's token
    if not host:
        raise UnsafeAddress(f"{label} {shown!r} has no host")
    if allow_private:
        return PinnedTarget(url, {}, {})
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeAddress(f"{label} host {host!r} does not resolve") from exc
    addresses = [str(info[4][0]) for info in infos]
    for address in addresses:
        if not is_public_address(address):
            raise UnsafeAddress(f"{label} {shown!r} points at a non-public address ({address}); {hint}")
    address = addresses[0]
    if address == host:
        return PinnedTarget(url, {}, {})
    literal = f"[{address}]" if ":" in address else address
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo + '@' if userinfo else ''}{literal}{f':{parts.port}' if parts.port else ''}"
    host_header = parts.netloc.rpartition("@")[2]
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return PinnedTarget(urlunsplit(parts._replace(netloc=netloc)), {"Host": host_header}, extensions)
