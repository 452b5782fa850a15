"""The JSON response class every part of the HTTP edge answers with."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic_core import to_json


class JSONBody(JSONResponse):
    """JSON rendered by pydantic-core: handles datetimes (RFC 3339, ``Z`` for UTC) and is fast.

    A :class:`JSONResponse` so that FastAPI describes a route's ``response_model`` as the body of its
    answer in the OpenAPI document (of any other response class it only says "a string").
    """

    def render(self, content: Any) -> bytes:
        return to_json(content)
