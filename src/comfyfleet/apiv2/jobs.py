"""``/api/v2/jobs``: submit (through the task service, like every front door), list, read, the workflow,
cancel. A v2 job is a comfyfleet task: the same record, queue, dispatch, metrics and ``/api/v1`` view."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from comfyfleet.apiv2.base import AppDep, LinksDep, PrincipalDep, V2App
from comfyfleet.apiv2.errors import V2Error
from comfyfleet.apiv2.requests import idempotency_key, job_request, list_query, read_json
from comfyfleet.apiv2.wire import (
    NEVER,
    TASK_STATUSES,
    Links,
    job_json,
    job_status,
    job_summary,
    labels_of,
    output_type,
)
from comfyfleet.assets import OutputAsset
from comfyfleet.domain import Task, TaskPhase, TaskStatus
from comfyfleet.http.responses import JSONBody
from comfyfleet.store import InvalidArgument
from comfyfleet.tasks import (
    CancelTask,
    GraphCheck,
    Idempotency,
    OnReuse,
    StoredInput,
    SubmitTask,
    TaskStateConflict,
)

router = APIRouter()

# Comfy API v2: an Idempotency-Key is used once and remembered for 24 hours.
IDEMPOTENCY_KEY_TTL_S = 24 * 3600
# A filtered listing looks at most this many jobs per page asked for before it answers with what it found
# (and a cursor to look further).
_SCAN_FACTOR = 10


def output_json(item: OutputAsset, links: Links) -> dict[str, Any]:
    asset, output = item.asset, item.output
    return {
        "node_id": str(output.get("node_id", "")),
        "name": asset.file_path,
        "type": output_type(output.get("kind"), asset.content_type),
        "content_type": asset.content_type,
        "size_bytes": asset.size,
        "id": asset.id,
        "hash": asset.hash,
        "url": links.content(asset.id),
        "url_expires_at": NEVER,
        "job_id": asset.job_id,
    }


async def job_of(app: V2App, task: Task, links: Links) -> dict[str, Any]:
    """The full v2 job of ``task``: its queue position while it waits, its outputs as assets."""
    position: int | None = None
    if task.status is TaskStatus.PENDING:
        position = await app.services.store.queue_position(task.id)
        if position is None:
            # Claimed (or cancelled) between the two reads: answer with the job as it now stands.
            task = await app.services.store.get_task(task.id)
    if task.status is TaskStatus.RUNNING and task.phase is not TaskPhase.EXECUTING:
        position = 0  # handed to a worker, which starts it next
    outputs = [output_json(item, links) for item in await app.assets.job_outputs(task)]
    return job_json(task, queue_position=position, outputs=outputs, links=links)


@router.post("/jobs", status_code=201)
async def submit_job(request: Request, app: AppDep, principal: PrincipalDep, links: LinksDep) -> JSONBody:
    """Check and queue a workflow; 201 once it is stored."""
    job = job_request(await read_json(request))
    key = idempotency_key(request.headers.get("idempotency-key"))
    resolved = await app.assets.resolve(job.workflow, principal.tenant)
    command = SubmitTask(
        payload=resolved.graph,
        tenant=principal.tenant,
        priority=job.priority,
        pool=job.pool,
        metadata={"labels": job.labels} if job.labels else None,
        idempotency=Idempotency(key, OnReuse.REFUSE, remember_s=IDEMPOTENCY_KEY_TTL_S) if key else None,
        graph_check=GraphCheck.FLEET,
        stored_inputs=tuple(
            StoredInput(name, asset.file.folder, asset.file.key, asset.size, asset.id)
            for name, asset in resolved.inputs
        ),
    )
    submitted = await app.services.tasks.submit(command)
    return JSONBody(await job_of(app, submitted.task, links), status_code=201)


@router.get("/jobs")
async def list_jobs(request: Request, app: AppDep, principal: PrincipalDep, links: LinksDep) -> JSONBody:
    """The caller's jobs, newest first, a page at a time (``next_cursor`` leads to the next)."""
    query = list_query(request.query_params)
    store = app.services.store
    task_statuses = None
    if query.statuses is not None:
        task_statuses = set().union(*(TASK_STATUSES[status] for status in query.statuses))
    filtering = query.statuses is not None or bool(query.labels)
    found: list[dict[str, Any]] = []
    cursor, scanned = query.cursor, 0
    while True:
        try:
            page = await store.list_tasks(
                tenant=principal.visible_tenant,
                statuses=task_statuses,
                limit=query.limit - len(found),
                cursor=cursor,
            )
        except InvalidArgument:
            raise V2Error(400, "invalid_cursor", "this cursor was not issued by this server") from None
        scanned += len(page.tasks)
        for task in page.tasks:
            if query.statuses is not None and job_status(task) not in query.statuses:
                continue
            if any(labels_of(task).get(key) != value for key, value in query.labels.items()):
                continue
            found.append(job_summary(task, links))
        cursor = page.next_cursor
        if (
            not filtering
            or cursor is None
            or len(found) >= query.limit
            or scanned >= query.limit * _SCAN_FACTOR
        ):
            break
    return JSONBody({"jobs": found, "next_cursor": cursor})


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, app: AppDep, principal: PrincipalDep, links: LinksDep) -> JSONBody:
    """The job as it stands: the source of truth (the event stream only hurries it along)."""
    task = await app.services.store.get_task(job_id, tenant=principal.visible_tenant)
    return JSONBody(await job_of(app, task, links))


@router.get("/jobs/{job_id}/workflow")
async def get_job_workflow(job_id: str, app: AppDep, principal: PrincipalDep) -> JSONBody:
    """The API-format graph the job runs (asset references already replaced by file names)."""
    task = await app.services.store.get_task(job_id, tenant=principal.visible_tenant)
    return JSONBody({"workflow": task.payload, "format": "api"})


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, app: AppDep, principal: PrincipalDep, links: LinksDep) -> JSONBody:
    """Ask for the job to stop: a queued job is canceled at once, a running one is ``canceling`` until its
    worker stopped it; an ended job is answered as it is (cancelling is idempotent)."""
    tenant = principal.visible_tenant
    try:
        task = await app.services.tasks.cancel(CancelTask(job_id, tenant))
    except TaskStateConflict:
        task = await app.services.store.get_task(job_id, tenant=tenant)
    return JSONBody(await job_of(app, task, links))
