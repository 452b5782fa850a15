"""The base of the HTTP edge: what the REST API, the ComfyUI gateway, the dashboard and ``/metrics`` share.

- ``app``: :class:`ServiceApp`, the FastAPI application carrying the services, its error handlers, the
  request body limit and the JSON response class (``responses``);
- ``services``: the typed :class:`Services` the composition root builds, ``deps`` the dependencies that
  hand them to routes;
- ``auth``: API keys and the caller (:class:`Principal`); ``errors``: the error shape and its handlers;
- ``wire``: the JSON form of a task, shared by every front door and the webhooks;
- ``pages``: the byte budget that keeps an answer listing many tasks bounded.

The parts of the edge import this package and never each other; ``comfyfleet.runtime`` mounts them.
"""

from comfyfleet.http.app import ServiceApp
from comfyfleet.http.services import FleetControl, PreviewSource, Services

__all__ = ["FleetControl", "PreviewSource", "ServiceApp", "Services"]
