"""``/api/v2/assets``: upload (multipart, deduplicated per tenant by blake3), the hash fast path (``HEAD
by-hash``, ``from-hash``), metadata, bytes (with ``Range``) and deletion. A job's outputs are assets too."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.responses import Response, StreamingResponse

from comfyfleet.apiv2.base import AppDep, LinksDep, PrincipalDep
from comfyfleet.apiv2.errors import V2Error, invalid_request
from comfyfleet.apiv2.requests import read_json
from comfyfleet.apiv2.wire import NEVER, Links
from comfyfleet.domain import Asset
from comfyfleet.http.responses import JSONBody
from comfyfleet.http.wire import utc

router = APIRouter()

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
MAX_TAGS = 32
MIN_EXPIRES_IN, MAX_EXPIRES_IN = 60, 604800


def asset_json(asset: Asset, links: Links, created_new: bool | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": asset.id,
        "hash": asset.hash,
        "size_bytes": asset.size,
        "content_type": asset.content_type,
        "file_path": asset.file_path,
        "created_at": utc(asset.created_at),
        "url": links.content(asset.id),
        "url_expires_at": NEVER,
        "expires_at": None,  # comfyfleet keeps assets until they are deleted
        "job_id": asset.job_id,
        "tags": list(asset.tags),
    }
    if created_new is not None:
        body["created_new"] = created_new
    return body


def _tags(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(tag, str) and len(tag) <= 100 for tag in value):
        raise invalid_request("'tags' must be a list of short strings")
    if len(value) > MAX_TAGS:
        raise invalid_request(f"at most {MAX_TAGS} tags")
    return value


def _expires_in(value: Any) -> None:
    """Checked for its bounds, then ignored: comfyfleet keeps assets until they are deleted."""
    if value is None or value == "":
        return
    try:
        seconds = int(value)
    except (TypeError, ValueError):
        seconds = -1
    if isinstance(value, bool) or not MIN_EXPIRES_IN <= seconds <= MAX_EXPIRES_IN:
        raise invalid_request(f"'expires_in' must be an integer from {MIN_EXPIRES_IN} to {MAX_EXPIRES_IN}")


@router.post("/assets", status_code=201)
async def upload_asset(request: Request, app: AppDep, principal: PrincipalDep, links: LinksDep) -> JSONBody:
    """201 with new bytes, 200 when the tenant had these bytes already (``created_new`` says which)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise invalid_request("send the asset as multipart/form-data (file, content_type, file_path)")
    async with request.form(max_files=1, max_fields=MAX_TAGS + 8, max_part_size=64 * 1024) as form:
        upload = form.get("file")
        content_type, file_path = form.get("content_type"), form.get("file_path")
        if not isinstance(upload, UploadFile):
            raise invalid_request("the 'file' part (the bytes) is required")
        if not isinstance(content_type, str) or not content_type or not isinstance(file_path, str):
            raise invalid_request("the 'content_type' and 'file_path' fields are required")
        expected = form.get("expected_hash")
        _expires_in(form.get("expires_in"))
        tags = [tag for tag in form.getlist("tags") if isinstance(tag, str)]
        asset, created = await app.assets.upload(
            principal.tenant,
            upload.file,
            content_type=content_type,
            file_path=file_path,
            expected_hash=expected if isinstance(expected, str) and expected else None,
            tags=_tags(tags),
        )
    return JSONBody(asset_json(asset, links, created), status_code=201 if created else 200)


@router.post("/assets/from-hash", status_code=201)
async def asset_from_hash(
    request: Request, app: AppDep, principal: PrincipalDep, links: LinksDep
) -> JSONBody:
    """A new asset over bytes the tenant uploaded before; 404 ``blob_not_found`` otherwise."""
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("hash"), str):
        raise invalid_request("the body must be a JSON object with 'hash' (blake3:<hex>)")
    file_path = body.get("file_path")
    if file_path is not None and not isinstance(file_path, str):
        raise invalid_request("'file_path' must be a string")
    _expires_in(body.get("expires_in"))
    asset = await app.assets.from_hash(
        principal.tenant, body["hash"], file_path=file_path, tags=_tags(body.get("tags"))
    )
    return JSONBody(asset_json(asset, links, False), status_code=201)


@router.head("/assets/by-hash/{hash_text}")
async def head_asset_by_hash(hash_text: str, app: AppDep, principal: PrincipalDep) -> Response:
    """200 when the tenant may mint an asset from these bytes (``from-hash``), else 404."""
    found = await app.assets.has_blob(principal.tenant, hash_text)
    return Response(status_code=200 if found else 404)


@router.get("/assets/{asset_id}")
async def get_asset(asset_id: str, app: AppDep, principal: PrincipalDep, links: LinksDep) -> JSONBody:
    return JSONBody(asset_json(await app.assets.get(asset_id, principal.visible_tenant), links))


@router.delete("/assets/{asset_id}", status_code=204)
async def delete_asset(asset_id: str, app: AppDep, principal: PrincipalDep) -> Response:
    """Delete the record; its bytes go with the tenant's last record over them."""
    await app.assets.delete(asset_id, principal.visible_tenant)
    return Response(status_code=204)


@router.get("/assets/{asset_id}/content")
async def get_asset_content(
    asset_id: str, request: Request, app: AppDep, principal: PrincipalDep
) -> Response:
    """The bytes, all (200) or one range (206, ``Range: bytes=first-last``)."""
    asset = await app.assets.get(asset_id, principal.visible_tenant)
    size = asset.size
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": f"inline; filename*=UTF-8''{quote((asset.file_path or asset.id).rsplit('/', 1)[-1])}",
        "X-Content-Type-Options": "nosniff",
    }
    wanted = byte_range(request.headers.get("range"), size)
    if wanted is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(
            app.assets.read_file(asset.file), media_type=asset.content_type, headers=headers
        )
    first, last = wanted
    headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    headers["Content-Length"] = str(last - first + 1)
    return StreamingResponse(
        app.assets.read_file(asset.file, first, last),
        status_code=206,
        media_type=asset.content_type,
        headers=headers,
    )


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one range ``header`` asks for, clipped to ``size``; None for the whole file (no header, or one this
    server does not serve in part, such as several ranges). 416 when it lies past the end."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text and not last_text:
        return None
    if not first_text:
        length = int(last_text)
        if length == 0:
            raise _unsatisfiable(size)
        return max(size - length, 0), size - 1
    first = int(first_text)
    if first >= size:
        raise _unsatisfiable(size)
    last = int(last_text) if last_text else size - 1
    if last < first:
        return None  # not a valid range: the whole file, as RFC 9110 asks
    return first, min(last, size - 1)


def _unsatisfiable(size: int) -> V2Error:
    return V2Error(
        416,
        "range_not_satisfiable",
        f"the range lies past the end of the asset ({size} bytes)",
        headers={"Content-Range": f"bytes */{size}"},
    )
