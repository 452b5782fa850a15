"""The HTTP API: FastAPI app factory, routes, wire schemas and the one place errors become statuses."""

from comfyfleet.api.app import create_app
from comfyfleet.api.errors import ApiError

__all__ = ["ApiError", "create_app"]
