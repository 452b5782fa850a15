"""``/view``, ``/upload/image`` and ``/upload/mask``: output and input files as ComfyUI serves and takes them."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

from fastapi import Request
from starlette.responses import Response, StreamingResponse

from comfyfleet.gateway import shapes
from comfyfleet.gateway.access import PrincipalDep
from comfyfleet.gateway.routes.group import RouteGroup, route
from comfyfleet.gateway.schemas import (
    EMPTY_NOT_FOUND,
    FILE,
    MASK_ORIGINAL_MISSING,
    UPLOAD_REFUSED,
    UPLOAD_TOO_LARGE,
    UploadedOut,
    answers,
    refused,
)
from comfyfleet.gateway.uploads import UploadError, strip_annotation
from comfyfleet.http.auth import Principal
from comfyfleet.http.errors import ApiError
from comfyfleet.http.responses import JSONBody
from comfyfleet.outputs import InvalidOutputName, OutputNotFound


@dataclass(slots=True)
class _Upload:
    data: bytes
    filename: str
    content_type: str
    fields: dict[str, str]


class FileRoutes(RouteGroup):
    @route(
        "GET",
        "/view",
        "An output or uploaded file (ComfyUI)",
        response_class=Response,
        responses=answers(FILE, refused("The file name or subfolder is not allowed"), EMPTY_NOT_FOUND),
    )
    async def view(
        self,
        principal: PrincipalDep,
        filename: str = "",
        subfolder: str = "",
        type: str = "output",
    ) -> Response:
        """`?filename=&subfolder=&type=`: outputs are named by the `executed` frames and `/history`
        (`subfolder` is the task id); `type=input` reads a file of `/upload/image`."""
        name, annotated = strip_annotation(filename)
        kind = annotated or type or "output"
        if not _safe_path(name) or ".." in subfolder.split("/") or subfolder.startswith("/"):
            return JSONBody(
                shapes.prompt_error("invalid_filename", "invalid filename or subfolder", ""), status_code=400
            )
        gateway = self.gateway
        if kind == "input":
            opened = (
                await gateway.uploads.open(principal.tenant, subfolder, name) if gateway.uploads else None
            )
            if opened is None:
                return Response(status_code=404)
            chunks, content_type, size = opened
            return _file_response(chunks, content_type, size, name)
        task_id = subfolder.split("/", 1)[0]
        if gateway.outputs is None or not await gateway.sees_task(task_id, principal):
            return Response(status_code=404)
        try:
            output = await gateway.outputs.open(task_id, name)
        except (OutputNotFound, InvalidOutputName):
            return Response(status_code=404)
        stored = output.stored
        if output.content is not None:  # most outputs: one piece, no stream
            return Response(
                output.content, media_type=stored.content_type, headers=_file_headers(stored.name)
            )
        return _file_response(
            gateway.outputs.read(task_id, stored.name), stored.content_type, stored.size, stored.name
        )

    @route(
        "POST",
        "/upload/image",
        "Upload an input image (ComfyUI)",
        response_model=UploadedOut,
        responses=answers(UPLOAD_REFUSED, UPLOAD_TOO_LARGE),
    )
    async def upload_image(self, request: Request, principal: PrincipalDep) -> Response:
        """Multipart `image` (+ `subfolder`, `type`, `overwrite`) → `{"name", "subfolder", "type"}`. The file
        is kept by comfyfleet and placed on whichever worker runs a prompt that reads it."""
        upload = await self._read_upload(request)
        if isinstance(upload, Response):
            return upload
        return await self._save_upload(principal, upload)

    @route(
        "POST",
        "/upload/mask",
        "Upload a mask for an image (ComfyUI)",
        response_model=UploadedOut,
        responses=answers(UPLOAD_REFUSED, UPLOAD_TOO_LARGE, MASK_ORIGINAL_MISSING),
    )
    async def upload_mask(self, request: Request, principal: PrincipalDep) -> Response:
        """As `/upload/image`, plus `original_ref` (JSON `{"filename", "subfolder", "type"}`): the upload's
        alpha channel is copied into that image (an earlier upload, or a task's output) and the result is
        kept as a PNG under the upload's name, as ComfyUI's mask editor expects."""
        upload = await self._read_upload(request)
        if isinstance(upload, Response):
            return upload
        try:
            reference = json.loads(upload.fields.get("original_ref") or "")
            name, annotated = strip_annotation(str(reference["filename"]))
            folder_type = annotated or str(reference.get("type") or "output")
            subfolder = str(reference.get("subfolder") or "")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return _text(400, 'original_ref must be JSON {"filename", "subfolder", "type"}')
        original = await self._read_file(principal, name, subfolder, folder_type)
        if original is None:
            return _text(404, f"the original image {name!r} ({folder_type}) does not exist")
        try:
            upload.data = await asyncio.to_thread(_apply_mask, original, upload.data)
        except (OSError, ValueError) as exc:
            return _text(400, f"cannot combine the mask with the image: {exc}")
        upload.content_type = "image/png"
        return await self._save_upload(principal, upload)

    async def _read_upload(self, request: Request) -> _Upload | Response:
        """The multipart body of an upload: its ``image`` file and the other fields; a 4xx answer when unusable."""
        if self.gateway.uploads is None:
            raise ApiError(503, "uploads_unavailable", "this server has no file storage for uploads")
        try:
            form = await request.form()
        except Exception as exc:  # python-multipart raises several unrelated types on a broken body
            return JSONBody(
                shapes.prompt_error("invalid_upload", f"the body is not a valid multipart form: {exc}", ""),
                status_code=400,
            )
        try:
            image = form.get("image")
            if image is None or isinstance(image, str):
                return _text(400, "no image file in the 'image' field")
            data = await image.read()
            fields = {key: value for key, value in form.items() if isinstance(value, str)}
            content_type = image.content_type or "application/octet-stream"
            upload = _Upload(data, image.filename or "", content_type, fields)
        finally:
            await form.close()  # its spooled temporary files
        limit = self.gateway.settings.limits.max_input_bytes
        if len(data) > limit:
            return _text(413, f"the file is larger than {limit} bytes")
        return upload

    async def _save_upload(self, principal: Principal, upload: _Upload) -> Response:
        assert self.gateway.uploads is not None  # checked by _read_upload
        overwrite = upload.fields.get("overwrite", "").lower() in {"true", "1"}
        try:
            name, subfolder = await self.gateway.uploads.save(
                principal.tenant,
                upload.filename,
                upload.fields.get("subfolder", ""),
                upload.data,
                content_type=upload.content_type,
                overwrite=overwrite,
            )
        except UploadError as exc:
            return _text(400, str(exc))
        return JSONBody({"name": name, "subfolder": subfolder, "type": upload.fields.get("type") or "input"})

    async def _read_file(self, principal: Principal, name: str, subfolder: str, kind: str) -> bytes | None:
        """An uploaded file (``input``) or a task's output (``output``, ``subfolder`` = the task id), or None."""
        gateway = self.gateway
        if kind == "input":
            reference = f"{subfolder}/{name}" if subfolder else name
            return await gateway.uploads.load(principal.tenant, reference) if gateway.uploads else None
        task = await gateway.visible_task(subfolder.split("/", 1)[0], principal)
        if task is None or gateway.outputs is None:
            return None
        try:
            return b"".join([chunk async for chunk in gateway.outputs.read(task.id, name)])
        except (OutputNotFound, InvalidOutputName):
            return None


def _safe_path(name: str) -> bool:
    return bool(name) and ".." not in name.split("/") and not name.startswith("/")


def _text(status: int, message: str) -> Response:
    return Response(message, status_code=status, media_type="text/plain")


def _apply_mask(original: bytes, mask: bytes) -> bytes:
    """ComfyUI's mask upload: the mask's alpha channel becomes the original image's, saved as PNG.
    Raises ``OSError`` for data that is not an image, ``ValueError`` for one too large to decode."""
    from PIL import Image  # only a server that takes masks pays for loading Pillow

    buffer = io.BytesIO()
    try:
        with Image.open(io.BytesIO(original)) as image, Image.open(io.BytesIO(mask)) as mask_image:
            combined = image.convert("RGBA")
            alpha = mask_image.convert("RGBA").getchannel("A")
            if alpha.size != combined.size:
                alpha = alpha.resize(combined.size)
            combined.putalpha(alpha)
            combined.save(buffer, format="PNG", compress_level=4)
    except Image.DecompressionBombError as exc:
        raise ValueError(str(exc)) from exc
    return buffer.getvalue()


def _file_headers(name: str) -> dict[str, str]:
    return {"Content-Disposition": f"filename*=UTF-8''{quote(name)}", "X-Content-Type-Options": "nosniff"}


def _file_response(
    chunks: AsyncIterator[bytes], content_type: str, size: int, name: str
) -> StreamingResponse:
    return StreamingResponse(
        chunks, media_type=content_type, headers={"Content-Length": str(size), **_file_headers(name)}
    )
