"""The ComfyUI-compatible routes, at the root and under ``/api`` (as ComfyUI registers them twice)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import platform
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request, WebSocket
from starlette.requests import HTTPConnection
from starlette.responses import Response, StreamingResponse

from comfyfleet.api.auth import Principal, principal_from
from comfyfleet.api.errors import ApiError, Unauthorized
from comfyfleet.api.schemas import JSONBody
from comfyfleet.domain import TERMINAL_STATUSES, Task, TaskStatus
from comfyfleet.gateway import shapes
from comfyfleet.gateway.service import Gateway, PromptRejected, gateway_of
from comfyfleet.gateway.socket import ComfySocket
from comfyfleet.gateway.uploads import UploadError, strip_annotation
from comfyfleet.outputs import InvalidOutputName, OutputNotFound
from comfyfleet.store import Conflict, NotFound

logger = logging.getLogger(__name__)

HISTORY_CAP = 1000  # /history without max_items lists at most this many (ComfyUI lists all it keeps)
QUEUE_CAP = 1000  # /queue lists at most this many pending prompts
_PAGE = 500


async def _principal_dependency(connection: HTTPConnection) -> Principal:
    # async: FastAPI runs a plain def dependency in a worker thread, a hop per request.
    return gateway_principal(connection)


async def _gateway_dependency(connection: HTTPConnection) -> Gateway:
    return gateway_of(connection)


def gateway_principal(connection: HTTPConnection) -> Principal:
    """The caller, from ``Authorization: Bearer <key>`` (or the dashboard's cookie) or, for clients that
    cannot set headers (browsers' WebSockets, ComfyUI scripts), ``?token=<key>``."""
    token = connection.query_params.get("token")
    if token and connection.headers.get("authorization") is None:
        principal: Principal = connection.app.state.keyring.principal_for(f"Bearer {token}")
        return principal
    return principal_from(connection)


PrincipalDep = Annotated[Principal, Depends(_principal_dependency)]
GatewayDep = Annotated[Gateway, Depends(_gateway_dependency)]


async def _json_body(request: Request) -> Any:
    # ComfyUI's own clients often post JSON without a JSON content type (urllib's default is a form).
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PromptRejected(
            shapes.prompt_error("invalid_json", f"The request body is not valid JSON: {exc}", "")
        ) from exc


def _rejected(exc: PromptRejected) -> Response:
    return JSONBody(exc.body, status_code=400)


async def _visible_task(gateway: Gateway, task_id: str, principal: Principal) -> Task | None:
    if not shapes.is_canonical_uuid(task_id):
        return None
    try:
        return await gateway.store.get_task(task_id, tenant=principal.visible_tenant)
    except NotFound:
        return None


@dataclass(slots=True)
class _Upload:
    data: bytes
    filename: str
    content_type: str
    fields: dict[str, str]


def _text(status: int, message: str) -> Response:
    return Response(message, status_code=status, media_type="text/plain")


async def _read_upload(request: Request, gateway: Gateway) -> _Upload | Response:
    """The multipart body of an upload: its ``image`` file and the other fields; a 4xx answer when unusable."""
    if gateway.uploads is None:
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
        upload = _Upload(data, image.filename or "", image.content_type or "application/octet-stream", fields)
    finally:
        await form.close()  # its spooled temporary files
    limit = gateway.settings.limits.max_input_bytes
    if len(data) > limit:
        return _text(413, f"the file is larger than {limit} bytes")
    return upload


async def _save_upload(gateway: Gateway, principal: Principal, upload: _Upload) -> Response:
    assert gateway.uploads is not None  # checked by _read_upload
    overwrite = upload.fields.get("overwrite", "").lower() in {"true", "1"}
    try:
        name, subfolder = await gateway.uploads.save(
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


async def _read_file(
    gateway: Gateway, principal: Principal, name: str, subfolder: str, kind: str
) -> bytes | None:
    """An uploaded file (``input``) or a task's output (``output``, ``subfolder`` = the task id), or None."""
    if kind == "input":
        reference = f"{subfolder}/{name}" if subfolder else name
        return (
            await gateway.uploads.load(principal.tenant, reference) if gateway.uploads is not None else None
        )
    task = await _visible_task(gateway, subfolder.split("/", 1)[0], principal)
    if task is None or gateway.outputs is None:
        return None
    try:
        return b"".join([chunk async for chunk in gateway.outputs.read(task.id, name)])
    except (OutputNotFound, InvalidOutputName):
        return None


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


async def _tasks(gateway: Gateway, principal: Principal, statuses: list[TaskStatus], cap: int) -> list[Task]:
    """Up to ``cap`` of the caller's tasks in ``statuses``, newest first."""
    found: list[Task] = []
    cursor = None
    while len(found) < cap:
        page = await gateway.store.list_tasks(
            tenant=principal.visible_tenant,
            statuses=statuses,
            limit=min(_PAGE, cap - len(found)),
            cursor=cursor,
        )
        found.extend(page.tasks)
        cursor = page.next_cursor
        if cursor is None:
            break
    return found


def build_router(*, include_in_schema: bool) -> APIRouter:
    router = APIRouter(tags=["comfyui"], include_in_schema=include_in_schema)

    @router.post("/prompt", summary="Queue a prompt (ComfyUI)")
    async def post_prompt(request: Request, principal: PrincipalDep, gateway: GatewayDep) -> Response:
        """ComfyUI's `POST /prompt`: `{"prompt": <API graph>, "client_id"?, "prompt_id"?, "extra_data"?,
        "front"?, "partial_execution_targets"?}` → `{"prompt_id", "number", "node_errors"}`. The prompt runs
        as a task on whichever worker is free; `prompt_id` is the task's id. comfyfleet options go in
        `extra_data.comfyfleet` (`priority`, `pool`). A rejected graph gets ComfyUI's 400 shape."""
        try:
            body = await _json_body(request)
            queued = await gateway.queue_prompt(body, principal.tenant)
        except PromptRejected as exc:
            return _rejected(exc)
        return JSONBody(
            {"prompt_id": queued.task.id, "number": queued.task.seq, "node_errors": queued.node_errors}
        )

    @router.get("/prompt", summary="Queue length (ComfyUI)")
    async def get_prompt(principal: PrincipalDep, gateway: GatewayDep) -> Response:
        return JSONBody(
            {"exec_info": {"queue_remaining": await gateway.queue_remaining(principal.visible_tenant)}}
        )

    @router.get("/queue", summary="Running and pending prompts (ComfyUI)")
    async def get_queue(principal: PrincipalDep, gateway: GatewayDep) -> Response:
        """Items are `[number, prompt_id, prompt, extra_data, outputs_to_execute]`; pending ones in the order
        they will run (at most 1,000)."""
        info = await gateway.catalogue.object_info()
        running = await _tasks(gateway, principal, [TaskStatus.RUNNING], QUEUE_CAP)
        pending = await _tasks(gateway, principal, [TaskStatus.PENDING], QUEUE_CAP)
        pending.sort(key=lambda task: (-task.priority, task.seq))
        return JSONBody(
            {
                "queue_running": [
                    shapes.queue_item(task, info) for task in sorted(running, key=lambda t: t.seq)
                ],
                "queue_pending": [shapes.queue_item(task, info) for task in pending],
            }
        )

    @router.post("/queue", summary="Delete pending prompts (ComfyUI)")
    async def post_queue(request: Request, principal: PrincipalDep, gateway: GatewayDep) -> Response:
        """`{"delete": [prompt_id…]}` cancels those pending prompts; `{"clear": true}` cancels every pending
        prompt queued through this gateway. As in ComfyUI, a running prompt is left alone (use
        `/interrupt`)."""
        try:
            body = await _json_body(request)
        except PromptRejected as exc:
            return _rejected(exc)
        body = body if isinstance(body, dict) else {}
        targets: list[Task] = []
        if body.get("clear") is True:
            pending = await _tasks(gateway, principal, [TaskStatus.PENDING], 100_000)
            targets.extend(task for task in pending if shapes.METADATA_KEY in (task.metadata or {}))
        for task_id in body.get("delete") or [] if isinstance(body.get("delete"), list) else []:
            task = await _visible_task(gateway, str(task_id), principal)
            if task is not None and task.status is TaskStatus.PENDING:
                targets.append(task)
        for task in targets:
            try:
                cancelled = await gateway.store.cancel_task(task.id, tenant=principal.visible_tenant)
            except (NotFound, Conflict):
                continue
            if cancelled.status is TaskStatus.CANCELLED:
                await gateway.announce(cancelled)
            else:  # it started meanwhile; the cancel stands, so stop it on its worker too
                await gateway.announce(cancelled, cancel=True)
        return Response(status_code=200)

    @router.post("/interrupt", summary="Interrupt a running prompt (ComfyUI)")
    async def post_interrupt(request: Request, principal: PrincipalDep, gateway: GatewayDep) -> Response:
        """`{"prompt_id": id}` stops that prompt if it is running (else nothing). Without a prompt_id, every
        running prompt queued through this gateway by the caller is stopped, as ComfyUI stops whatever it runs."""
        try:
            body = await _json_body(request)
        except PromptRejected:
            body = None  # ComfyUI tolerates a bad body here: a global interrupt
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        if prompt_id:
            task = await _visible_task(gateway, str(prompt_id), principal)
            targets = [task] if task is not None and task.status is TaskStatus.RUNNING else []
        else:
            running = await _tasks(gateway, principal, [TaskStatus.RUNNING], 10_000)
            targets = [task for task in running if shapes.METADATA_KEY in (task.metadata or {})]
        for task in targets:
            try:
                stopping = await gateway.store.cancel_task(task.id, tenant=principal.visible_tenant)
            except (NotFound, Conflict):
                continue
            await gateway.announce(stopping, cancel=stopping.status is TaskStatus.RUNNING)
        return Response(status_code=200)

    @router.get("/history", summary="Finished prompts (ComfyUI)")
    async def get_history(
        principal: PrincipalDep, gateway: GatewayDep, max_items: str | None = None, offset: str | None = None
    ) -> Response:
        """`{prompt_id: entry}` oldest first; `max_items=N` gives the last N, `offset=K` skips the K oldest
        (within the 1,000 most recent)."""
        try:
            limit = int(max_items) if max_items not in (None, "") else None
            skip = int(offset) if offset not in (None, "") else -1
        except ValueError:
            return JSONBody(
                shapes.prompt_error("invalid_parameter", "max_items and offset must be integers", ""),
                status_code=400,
            )
        cap = HISTORY_CAP if limit is None or skip >= 0 else max(0, min(limit, HISTORY_CAP))
        finished = await _tasks(gateway, principal, sorted(TERMINAL_STATUSES), cap * 2 if cap else 0)
        entries = [task for task in reversed(finished) if shapes.enters_history(task)][-cap:] if cap else []
        if skip < 0 and limit is not None:
            skip = max(0, len(entries) - limit)
        selected = entries[max(skip, 0) :]
        if limit is not None:
            selected = selected[: max(limit, 0)]
        info = await gateway.catalogue.object_info()
        return JSONBody({task.id: shapes.history_entry(task, info) for task in selected})

    @router.get("/history/{prompt_id}", summary="One finished prompt (ComfyUI)")
    async def get_history_entry(prompt_id: str, principal: PrincipalDep, gateway: GatewayDep) -> Response:
        """`{prompt_id: entry}` once the prompt finished; `{}` while it waits or runs, or when unknown."""
        task = await _visible_task(gateway, prompt_id, principal)
        if task is None or not shapes.enters_history(task):
            return JSONBody({})
        return JSONBody({task.id: shapes.history_entry(task, await gateway.catalogue.object_info())})

    @router.post("/history", summary="Delete history (ComfyUI; kept)")
    async def post_history(principal: PrincipalDep) -> Response:
        """Accepted for compatibility; comfyfleet keeps every task's record and outputs."""
        del principal
        return Response(status_code=200)

    @router.get("/view", summary="An output or uploaded file (ComfyUI)")
    async def view(
        principal: PrincipalDep,
        gateway: GatewayDep,
        filename: str = "",
        subfolder: str = "",
        type: str = "output",
    ) -> Response:
        """`?filename=&subfolder=&type=`: outputs are named by the `executed` frames and `/history`
        (`subfolder` is the task id); `type=input` reads a file of `/upload/image`."""
        name, annotated = strip_annotation(filename)
        kind = annotated or type or "output"
        if (
            not name
            or ".." in name.split("/")
            or name.startswith("/")
            or ".." in subfolder.split("/")
            or subfolder.startswith("/")
        ):
            return JSONBody(
                shapes.prompt_error("invalid_filename", "invalid filename or subfolder", ""), status_code=400
            )
        if kind == "input":
            if gateway.uploads is None:
                return Response(status_code=404)
            opened = await gateway.uploads.open(principal.tenant, subfolder, name)
            if opened is None:
                return Response(status_code=404)
            chunks, content_type, size = opened
            return _file_response(chunks, content_type, size, name)
        task_id = subfolder.split("/", 1)[0]
        task = await _visible_task(gateway, task_id, principal)
        if task is None or gateway.outputs is None:
            return Response(status_code=404)
        try:
            stored = await gateway.outputs.stat(task.id, name)
        except (OutputNotFound, InvalidOutputName):
            return Response(status_code=404)
        return _file_response(
            gateway.outputs.read(task.id, stored.name), stored.content_type, stored.size, stored.name
        )

    @router.post("/upload/image", summary="Upload an input image (ComfyUI)")
    async def upload_image(request: Request, principal: PrincipalDep, gateway: GatewayDep) -> Response:
        """Multipart `image` (+ `subfolder`, `type`, `overwrite`) → `{"name", "subfolder", "type"}`. The file
        is kept by comfyfleet and placed on whichever worker runs a prompt that reads it."""
        upload = await _read_upload(request, gateway)
        if isinstance(upload, Response):
            return upload
        return await _save_upload(gateway, principal, upload)

    @router.post("/upload/mask", summary="Upload a mask for an image (ComfyUI)")
    async def upload_mask(request: Request, principal: PrincipalDep, gateway: GatewayDep) -> Response:
        """As `/upload/image`, plus `original_ref` (JSON `{"filename", "subfolder", "type"}`): the upload's
        alpha channel is copied into that image (an earlier upload, or a task's output) and the result is
        kept as a PNG under the upload's name, as ComfyUI's mask editor expects."""
        upload = await _read_upload(request, gateway)
        if isinstance(upload, Response):
            return upload
        try:
            reference = json.loads(upload.fields.get("original_ref") or "")
            name, annotated = strip_annotation(str(reference["filename"]))
            folder_type = annotated or str(reference.get("type") or "output")
            subfolder = str(reference.get("subfolder") or "")
        except (ValueError, KeyError, TypeError, AttributeError):
            return _text(400, 'original_ref must be JSON {"filename", "subfolder", "type"}')
        original = await _read_file(gateway, principal, name, subfolder, folder_type)
        if original is None:
            return _text(404, f"the original image {name!r} ({folder_type}) does not exist")
        try:
            upload.data = await asyncio.to_thread(_apply_mask, original, upload.data)
        except (OSError, ValueError) as exc:
            return _text(400, f"cannot combine the mask with the image: {exc}")
        upload.content_type = "image/png"
        return await _save_upload(gateway, principal, upload)

    @router.get("/object_info", summary="Node catalogue of the fleet (ComfyUI)")
    async def object_info(principal: PrincipalDep, gateway: GatewayDep) -> Response:
        """Every node class some worker offers (merged over the live workers, cached)."""
        del principal
        info = await gateway.catalogue.object_info()
        if info is None:
            raise ApiError(
                503,
                "no_workers",
                "no worker has been up yet to describe its nodes; try again when one is",
                headers={"Retry-After": "5"},
            )
        return JSONBody(info)

    @router.get("/object_info/{node_class}", summary="One node class (ComfyUI)")
    async def object_info_one(node_class: str, principal: PrincipalDep, gateway: GatewayDep) -> Response:
        del principal
        info = await gateway.catalogue.object_info() or {}
        return JSONBody({node_class: info[node_class]} if node_class in info else {})

    @router.get("/system_stats", summary="System and devices (ComfyUI)")
    async def system_stats(principal: PrincipalDep, gateway: GatewayDep) -> Response:
        """This server's system facts; `devices` lists every live worker's devices, named after the worker."""
        del principal
        stats = await gateway.catalogue.system_stats()
        first = stats[0][1].get("system", {}) if stats else {}
        devices = []
        for worker, answer in stats:
            for device in answer.get("devices") or []:
                if isinstance(device, dict):
                    devices.append(
                        {**device, "name": f"{worker.id}: {device.get('name', '')}", "worker_id": worker.id}
                    )
        system = {
            "os": os.name,
            "ram_total": 0,
            "ram_free": 0,
            "comfyui_version": first.get("comfyui_version", "comfyfleet"),
            "python_version": sys.version,
            "pytorch_version": first.get("pytorch_version", ""),
            "embedded_python": False,
            "argv": ["comfyfleet"],
            "platform": platform.platform(),
            "workers": len(stats),
        }
        try:
            import psutil

            memory = psutil.virtual_memory()
            system["ram_total"], system["ram_free"] = memory.total, memory.available
        except Exception:  # best effort: the facts are informative only
            logger.debug("system_stats_memory_unavailable", exc_info=True)
        return JSONBody({"system": system, "devices": devices})

    @router.get("/features", summary="Server feature flags (ComfyUI)")
    async def features(principal: PrincipalDep, gateway: GatewayDep) -> Response:
        del principal
        return JSONBody(
            {"supports_preview_metadata": False, "max_upload_size": gateway.settings.limits.max_input_bytes}
        )

    @router.websocket("/ws")
    async def websocket(websocket: WebSocket) -> None:
        """ComfyUI's WebSocket (`?clientId=X`): status frames, and the frames of X's prompts."""
        try:
            principal = gateway_principal(websocket)
        except Unauthorized:
            await websocket.close(code=1008, reason="an API key is needed: ?token=<key> or Authorization")
            return
        gateway = gateway_of(websocket)
        client_id = websocket.query_params.get("clientId") or None
        socket = ComfySocket(websocket, gateway, gateway.bus, principal.visible_tenant, client_id)
        await socket.serve()

    return router


def _file_response(
    chunks: AsyncIterator[bytes], content_type: str, size: int, name: str
) -> StreamingResponse:
    return StreamingResponse(
        chunks,
        media_type=content_type,
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f"filename*=UTF-8''{quote(name)}",
            "X-Content-Type-Options": "nosniff",
        },
    )
