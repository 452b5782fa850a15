"""The JSON response class every part of the HTTP edge answers with."""

from __future__ import annotations

from typing import Any

from pydantic_core import to_json
from starlette.responses import Response


class JSONBody(Response):
    """JSON rendered by pydantic-core: handles datetimes (RFC 3339, ``Z`` for UTC) and is fast."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return to_json(content)
