"""Download the output files comfyfleet collected for a task."""

from __future__ import annotations

import logging
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Request
from starlette.responses import StreamingResponse

from comfyfleet.api.auth import Principal, authenticate
from comfyfleet.api.deps import get_store
from comfyfleet.api.errors import ApiError
from comfyfleet.api.routes.tasks import TaskId, _checked_task_id
from comfyfleet.api.schemas import error_responses
from comfyfleet.outputs import InvalidOutputName, OutputNotFound, OutputsError, OutputStore
from comfyfleet.store import Store

logger = logging.getLogger(__name__)
router = APIRouter(tags=["tasks"])


async def get_outputs(request: Request) -> OutputStore:
    outputs: OutputStore = request.app.state.outputs
    return outputs


@router.get(
    "/tasks/{task_id}/outputs/{filename}",
    summary="Download an output file",
    responses={200: {"content": {"image/png": {}, "application/octet-stream": {}}, "description": "The file."},
               **error_responses(401, 404, 503)},
)
async def download_output(
    task_id: TaskId,
    filename: Annotated[str, Path(description="The output's `filename` as listed in the task's result.", max_length=255)],
    principal: Annotated[Principal, Depends(authenticate)],
    store: Annotated[Store, Depends(get_store)],
    outputs: Annotated[OutputStore, Depends(get_outputs)],
) -> StreamingResponse:
    """The bytes of one output of a finished task, with its content type."""
    task = await store.get_task(_checked_task_id(task_id), tenant=principal.visible_tenant)
    try:
        stored = await outputs.stat(task.id, filename)
    except (OutputNotFound, InvalidOutputName):
        raise ApiError(404, "not_found", f"task {task.id} has no output {filename[:100]!r}") from None
    except OutputsError as exc:
        # The storage itself failed (an S3 bucket unreachable, credentials refused): not the client's fault.
        logger.warning("output_store_unavailable task_id=%s error=%s", task.id, exc)
        raise ApiError(503, "outputs_unavailable", "the output store failed to answer; try again shortly") from None
    return StreamingResponse(
        outputs.read(task.id, filename),
        media_type=stored.content_type,
        headers={
            "Content-Length": str(stored.size),
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(stored.name)}",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, max-age=86400, immutable",
        },
    )
