"""A group of the gateway's routes: methods marked with :func:`route`, bound to the application's gateway."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter

from comfyfleet.gateway.service import Gateway

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])
_MARK = "_gateway_route"


@dataclass(frozen=True, slots=True)
class _Route:
    method: str  # an HTTP method, or "WEBSOCKET"
    path: str
    summary: str | None
    options: dict[str, Any]


def route(
    method: str, path: str, summary: str | None = None, **options: Any
) -> Callable[[Endpoint], Endpoint]:
    """Mark a method of a :class:`RouteGroup` as the endpoint of ``method path`` (``"WEBSOCKET"``: a socket).
    ``options`` go to FastAPI's ``add_api_route`` (``responses``, ``response_model``, ``response_class``)."""

    def mark(endpoint: Endpoint) -> Endpoint:
        vars(endpoint)[_MARK] = _Route(method, path, summary, options)
        return endpoint

    return mark


class RouteGroup:
    """Its marked methods become the routes of ``router``, in the order they are defined, each bound to one
    application's :class:`Gateway` (so the routes need no lookup of the application's state)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.router = APIRouter(tags=["comfyui"])
        for name, member in vars(type(self)).items():
            spec = getattr(member, _MARK, None)
            if not isinstance(spec, _Route):
                continue
            endpoint = getattr(self, name)
            if spec.method == "WEBSOCKET":
                self.router.add_api_websocket_route(spec.path, endpoint)
            else:
                self.router.add_api_route(
                    spec.path, endpoint, methods=[spec.method], summary=spec.summary, **spec.options
                )
