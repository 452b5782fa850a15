"""Download the output files comfyfleet collected for a task, and the latest preview of a running one."""

from __future__ import annotations

import logging
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Path
from starlette.responses import Response, StreamingResponse

from comfyfleet.api.routes.tasks import TaskId, checked_task_id
from comfyfleet.api.schemas import error_responses
from comfyfleet.http.deps import OutputsDep, PrincipalDep, ServicesDep, StoreDep
from comfyfleet.http.errors import ApiError
from comfyfleet.outputs import InvalidOutputName, OutputNotFound, OutputsError
from comfyfleet.store import NotFound

logger = logging.getLogger(__name__)
router = APIRouter(tags=["tasks"])
MAX_FILENAME_LENGTH = 255


@router.get(
    "/tasks/{task_id}/outputs/{filename}",
    summary="Download an output file",
    response_class=Response,
    responses={
        200: {
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The file, in its own content type (e.g. image/png).",
        },
        **error_responses(401, 404, 503),
    },
)
async def download_output(
    task_id: TaskId,
    filename: Annotated[
        str,
        Path(
            description="The output's `filename` as listed in the task's result.",
            max_length=MAX_FILENAME_LENGTH,
        ),
    ],
    principal: PrincipalDep,
    store: StoreDep,
    outputs: OutputsDep,
) -> Response:
    """The bytes of one output of a finished task, with its content type."""
    task_id = checked_task_id(task_id)
    # Whether the caller has the task is all that is needed of it: a light read, not the whole record.
    if await store.task_status(task_id, tenant=principal.visible_tenant) is None:
        raise NotFound(f"task {task_id} not found")
    try:
        opened = await outputs.open(task_id, filename)
    except (OutputNotFound, InvalidOutputName):
        raise ApiError(404, "not_found", f"task {task_id} has no output {filename[:100]!r}") from None
    except OutputsError as exc:
        # The storage itself failed (an S3 bucket unreachable, credentials refused): not the client's fault.
        logger.warning("output_store_unavailable task_id=%s error=%s", task_id, exc)
        raise ApiError(
            503, "outputs_unavailable", "the output store failed to answer; try again shortly"
        ) from None
    stored = opened.stored
    headers = {
        "Content-Length": str(stored.size),
        "Content-Disposition": f"inline; filename*=UTF-8''{quote(stored.name)}",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "private, max-age=86400, immutable",
    }
    if opened.content is not None:  # most outputs: one piece, no stream
        return Response(opened.content, media_type=stored.content_type, headers=headers)
    return StreamingResponse(outputs.read(task_id, filename), media_type=stored.content_type, headers=headers)


@router.get(
    "/tasks/{task_id}/preview",
    summary="The latest preview image of a running task",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}, "image/png": {}}, "description": "The newest preview."},
        **error_responses(401, 404, 503),
    },
)
async def latest_preview(
    task_id: TaskId,
    principal: PrincipalDep,
    store: StoreDep,
    services: ServicesDep,
) -> Response:
    """The newest preview image a worker sent for a running task (samplers send one per step when ComfyUI
    runs with previews on). `preview` events on the task's event stream say when a new one arrived.
    Previews are kept in memory by the replica that runs the task, never stored: once the task ends, or
    when another replica runs it, this is a 404 `no_preview`."""
    task = await store.get_task(checked_task_id(task_id), tenant=principal.visible_tenant)
    latest = services.previews.latest_preview(task.id) if services.previews is not None else None
    if latest is None:
        raise ApiError(
            404,
            "no_preview",
            f"task {task.id} has no preview here (not running on this replica, or its workflow sends none)",
        )
    image, content_type, sequence = latest
    return Response(
        image,
        media_type=content_type,
        headers={"Cache-Control": "no-store", "X-Preview-Sequence": str(sequence)},
    )
