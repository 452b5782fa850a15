"""``/upload/image`` and ``/view``: the input, output and temp folders, with upstream's checks."""

from __future__ import annotations

import asyncio
import io
import os
from typing import TYPE_CHECKING

from aiohttp import web
from PIL import Image

from comfyfleet.emulators.comfyui.routes.common import Route

if TYPE_CHECKING:
    from comfyfleet.emulators.comfyui.server import EmulatorServer


class FileRoutes:
    def __init__(self, server: EmulatorServer) -> None:
        self.server = server

    def routes(self) -> list[Route]:
        return [("POST", "/upload/image", self.post_upload_image), ("GET", "/view", self.get_view)]

    async def post_upload_image(self, request: web.Request) -> web.Response:
        try:
            post = await request.post()
        except ValueError:
            return web.Response(status=400)
        image = post.get("image")
        if not isinstance(image, web.FileField) or not image.filename:
            return web.Response(status=400)
        kind = str(post.get("type") or "input")
        root = self.server.folder(kind)
        if root is None:
            kind, root = "input", self.server.input_dir
        subfolder = str(post.get("subfolder", ""))
        overwrite = str(post.get("overwrite")) in ("true", "1")
        stored = await asyncio.to_thread(
            store_upload, root, subfolder, image.filename, image.file.read(), overwrite
        )
        if stored is None:
            return web.Response(status=400)
        return web.json_response({"name": stored, "subfolder": subfolder, "type": kind})

    async def get_view(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        if "filename" not in query:
            return web.Response(status=404)
        filename = query["filename"]
        kind = query.get("type", "output")
        for suffix in ("input", "output", "temp"):
            if filename.endswith(f" [{suffix}]"):
                filename, kind = filename[: -len(suffix) - 3], suffix
        if not filename or filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        root = self.server.folder(kind)
        if root is None:
            return web.Response(status=400)
        status, path = view_path(root, query.get("subfolder"), filename)
        if path is None:
            return web.Response(status=status)
        filename = os.path.basename(filename)
        headers = {"Content-Disposition": f'filename="{filename}"', "X-Content-Type-Options": "nosniff"}
        preview = query.get("preview")
        channel = query.get("channel", "rgba")
        if preview or channel in ("rgb", "a"):
            body, content_type = await asyncio.to_thread(transcode, path, preview, channel)
            return web.Response(body=body, content_type=content_type, headers=headers)
        return web.FileResponse(path, headers=headers)


def store_upload(root: str, subfolder: str, filename: str, data: bytes, overwrite: bool) -> str | None:
    """Upstream's ``image_upload``: the stored name, or None for a subfolder escape. Identical bytes under
    the same name are not copied again; different bytes get ``"name (1).png"`` unless ``overwrite``."""
    folder = os.path.join(root, os.path.normpath(subfolder)) if subfolder else root
    path = os.path.abspath(os.path.join(folder, filename))
    if os.path.commonpath((root, path)) != root:
        return None
    os.makedirs(folder, exist_ok=True)
    if not overwrite:
        stem, ext = os.path.splitext(filename)
        counter = 1
        while os.path.exists(path):
            with open(path, "rb") as existing:
                if existing.read() == data:
                    return filename
            filename = f"{stem} ({counter}){ext}"
            path = os.path.join(folder, filename)
            counter += 1
    with open(path, "wb") as file:
        file.write(data)
    return filename


def view_path(root: str, subfolder: str | None, filename: str) -> tuple[int, str | None]:
    if subfolder is not None:
        full = os.path.join(root, subfolder)
        if os.path.commonpath((os.path.abspath(full), root)) != root:
            return 403, None
        root = full
    path = os.path.join(root, os.path.basename(filename))
    return (200, path) if os.path.isfile(path) else (404, None)


def transcode(path: str, preview: str | None, channel: str) -> tuple[bytes, str]:
    with Image.open(path) as opened:
        image = opened.convert("RGBA")
    if channel == "rgb":
        image = image.convert("RGB")
    elif channel == "a":
        alpha = image.getchannel("A")
        image = Image.merge("RGBA", (alpha, alpha, alpha, alpha))
    buffer = io.BytesIO()
    if preview:
        image_format, _, quality = preview.partition(";")
        image_format = "webp" if image_format not in ("webp", "jpeg") else image_format
        image.convert("RGB").save(
            buffer, format=image_format.upper(), quality=int(quality) if quality.isdigit() else 90
        )
        return buffer.getvalue(), f"image/{image_format}"
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"
