"""The JSON response class every part of the HTTP edge answers with."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse
from pydantic_core import PydanticSerializationError, to_json, to_jsonable_python


def json_bytes(content: Any) -> bytes:
    """``content`` as JSON, rendered by pydantic-core (datetimes as RFC 3339, ``Z`` for UTC; fast).

    A lone UTF-16 surrogate has no UTF-8 form, so pydantic-core refuses it; the task service refuses such
    text at the door, but a record stored before that check must not make every answer that holds it fail:
    it is then written with ``\\ud800`` escapes, as JSON allows.
    """
    try:
        return to_json(content)
    except PydanticSerializationError:
        return json.dumps(to_jsonable_python(content), separators=(",", ":")).encode("ascii")


class JSONBody(JSONResponse):
    """JSON rendered by :func:`json_bytes`.

    A :class:`JSONResponse` so that FastAPI describes a route's ``response_model`` as the body of its
    answer in the OpenAPI document (of any other response class it only says "a string").
    """

    def render(self, content: Any) -> bytes:
        return json_bytes(content)
