"""``/api/v1/tasks``: submit, list, read and cancel tasks (the seed's routes and fields).

Commands go to the task service (``comfyfleet.tasks``); its refusals are worded by ``api/errors.py``.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query
from starlette.responses import Response

from comfyfleet.api.schemas import TaskListOut, TaskOut, TaskSubmission, TaskUpdate, error_responses
from comfyfleet.api.submit_route import (
    MAX_IDEMPOTENCY_KEY_LENGTH,
    MAX_WAIT_S,
    SubmitRoute,
    submission_command,
    submitted_response,
)
from comfyfleet.domain import TaskStatus
from comfyfleet.http.deps import EstimatorDep, PrincipalDep, SettingsDep, StoreDep, TasksDep
from comfyfleet.http.errors import ApiError, InvalidInput
from comfyfleet.http.pages import ByteBudget, json_array
from comfyfleet.http.responses import JSONBody, json_bytes
from comfyfleet.http.wire import delivery_json, task_json
from comfyfleet.store import cursor_after
from comfyfleet.tasks import CancelTask, ChangePriority

router = APIRouter(tags=["tasks"])

MAX_LIST_LIMIT = 500

MAX_TASK_ID_LENGTH = 64
TaskId = Annotated[str, Path(description="The task's id (a UUID).", max_length=MAX_TASK_ID_LENGTH)]


async def submit_task(
    submission: TaskSubmission,
    principal: PrincipalDep,
    tasks: TasksDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=MAX_IDEMPOTENCY_KEY_LENGTH,
            description="Retry-safe submission: the same key from the same tenant returns the original task "
            "(200) instead of creating another.",
        ),
    ] = None,
    wait: Annotated[
        float | None,
        Query(
            ge=0,
            le=MAX_WAIT_S,
            description="Answer only when the task has ended, or after this many "
            "seconds (then with the task as it stands): synchronous use without polling.",
        ),
    ] = None,
) -> Response:
    """Queue a ComfyUI workflow (an API-format graph) to run on the fleet.

    The graph is checked before it is stored: every node needs a `class_type` and an `inputs` object,
    every link `[node_id, output_index]` must name a node of the graph, and the links must not form a
    cycle. A 422 `invalid_graph` lists every problem with the node and input at fault.
    The task is durably stored before the 201 is sent.
    """
    command = submission_command(submission, principal.tenant, idempotency_key)
    return submitted_response(await tasks.submit(command, wait_s=wait))


# Plain submissions (the hot path) are answered by SubmitRoute itself; FastAPI handles the rest.
router.add_api_route(
    "/tasks",
    submit_task,
    methods=["POST"],
    route_class_override=SubmitRoute,
    status_code=201,
    response_model=TaskOut,
    summary="Submit a workflow",
    responses={
        200: {"model": TaskOut, "description": "This Idempotency-Key was used before: the original task."},
        **error_responses(400, 401, 413, 415, 422, 503),
    },
)


def _parse_statuses(raw: str | None) -> list[TaskStatus] | None:
    if raw is None:
        return None
    names = [part.strip().lower() for part in raw.split(",") if part.strip()]
    valid = {status.value for status in TaskStatus}
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise InvalidInput(
            f"unknown status {', '.join(map(repr, unknown))}; use one or more of {', '.join(sorted(valid))}",
            [{"loc": ["query", "status"], "message": "unknown status", "type": "enum"}],
        )
    return [TaskStatus(name) for name in dict.fromkeys(names)] or None


def _parse_include(raw: str | None) -> bool:
    """Whether ``?include=`` asks for the payloads (the one field lists leave out unless asked)."""
    names = {part.strip().lower() for part in (raw or "").split(",") if part.strip()}
    unknown = sorted(names - {"payload"})
    if unknown:
        raise InvalidInput(
            f"unknown include {', '.join(map(repr, unknown))}; lists can include: payload",
            [{"loc": ["query", "include"], "message": "unknown field to include", "type": "enum"}],
        )
    return "payload" in names


@router.get(
    "/tasks",
    response_model=TaskListOut,
    summary="List tasks",
    responses=error_responses(401, 422, 503),
)
async def list_tasks(
    principal: PrincipalDep,
    store: StoreDep,
    settings: SettingsDep,
    status: Annotated[
        str | None,
        Query(
            description="Only tasks in these statuses, comma-separated (e.g. pending,running).",
            max_length=200,
        ),
    ] = None,
    workflow_id: Annotated[
        str | None, Query(description="Only tasks with this workflow_id.", max_length=256)
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIST_LIMIT, description="Page size (most tasks in a page).")
    ] = 50,
    cursor: Annotated[
        str | None, Query(description="The next_cursor of the previous page.", max_length=200)
    ] = None,
    include: Annotated[
        str | None,
        Query(
            description="`payload`: give each task its workflow graph too (left out by default). A page with "
            "payloads may hold fewer than `limit` tasks: see the byte budget above.",
            max_length=100,
        ),
    ] = None,
) -> Response:
    """Tasks newest first, in pages: follow `next_cursor` until it is null. A tenant sees its own tasks.

    Tasks are listed without their `payload` unless `?include=payload`, and always with input files
    summarised (name and size). An answer holds at most `limits.max_page_bytes` (8 MiB by default) of tasks:
    a page stops before the task that would take it past that, however large `limit`, and `next_cursor` goes
    on from there (a page always holds at least one task, so a single larger task comes alone)."""
    with_payload = _parse_include(include)
    page = await store.list_tasks(
        tenant=principal.visible_tenant,
        statuses=_parse_statuses(status),
        workflow_id=workflow_id,
        limit=limit,
        cursor=cursor,
    )
    budget = ByteBudget(settings.limits.max_page_bytes)
    pieces: list[bytes] = []
    next_cursor = page.next_cursor
    for listed in page.tasks:
        # A list is read without payloads; one asked for is read with its task, one task at a time.
        task = await store.get_task(listed.id) if with_payload else listed
        piece = json_bytes(task_json(task, include_payload=with_payload))
        if not budget.take(piece):
            next_cursor = cursor_after(page.tasks[len(pieces) - 1])
            break
        pieces.append(piece)
    tail = b',"count":%d,"next_cursor":%b}' % (len(pieces), json_bytes(next_cursor))
    return Response(b"".join([b'{"tasks":', *json_array(pieces), tail]), media_type="application/json")


def checked_task_id(task_id: str) -> str:
    # Ids are UUIDs; anything else cannot exist, and some databases would reject it with a type error.
    try:
        return str(uuid.UUID(task_id))
    except ValueError:
        raise ApiError(404, "not_found", f"no task {task_id[:80]!r}") from None


@router.get(
    "/tasks/{task_id}",
    response_model=TaskOut,
    summary="Get a task",
    responses=error_responses(401, 404, 503),
)
async def get_task(
    task_id: TaskId,
    principal: PrincipalDep,
    store: StoreDep,
    estimator: EstimatorDep,
) -> Response:
    """The whole task. A pending task also has `queue_position` (1 = next to run) and `estimated_start_s`
    (a rough estimate from the ready workers and recent execution times; null when there is no basis)."""
    task = await store.get_task(checked_task_id(task_id), tenant=principal.visible_tenant)
    position = await store.queue_position(task.id) if task.status is TaskStatus.PENDING else None
    body = task_json(
        task, queue_position=position, estimated_start_s=await estimator.start_in_s(task, position)
    )
    if task.webhook is not None:
        body["webhook_deliveries"] = [
            delivery_json(delivery) for delivery in await store.webhook_deliveries(task.id)
        ]
    return JSONBody(body)


@router.patch(
    "/tasks/{task_id}",
    response_model=TaskOut,
    summary="Change a pending task's priority",
    responses=error_responses(401, 404, 409, 415, 422, 503),
)
async def update_task(
    task_id: TaskId,
    update: TaskUpdate,
    principal: PrincipalDep,
    store: StoreDep,
    tasks: TasksDep,
    estimator: EstimatorDep,
) -> Response:
    """Move a waiting task up or down the queue: `{"priority": N}`. Among equal priorities it keeps its
    submission order. The answer has its new `queue_position`. A task that already started is a 409."""
    command = ChangePriority(checked_task_id(task_id), update.priority, principal.visible_tenant)
    task = await tasks.change_priority(command)
    position = await store.queue_position(task.id)
    return JSONBody(
        task_json(task, queue_position=position, estimated_start_s=await estimator.start_in_s(task, position))
    )


@router.delete(
    "/tasks/{task_id}",
    response_model=TaskOut,
    summary="Cancel a task",
    responses={
        202: {
            "model": TaskOut,
            "description": "The task is running: cancel_requested is true and the worker's "
            "prompt is being stopped; the task becomes cancelled shortly.",
        },
        **error_responses(401, 404, 409, 503),
    },
)
async def cancel_task(task_id: TaskId, principal: PrincipalDep, tasks: TasksDep) -> Response:
    """Cancel a task. A pending task is cancelled at once (200). A running one is stopped on its worker
    (202 with `cancel_requested: true`). A task that already ended is a 409."""
    task = await tasks.cancel(CancelTask(checked_task_id(task_id), principal.visible_tenant))
    return JSONBody(task_json(task), status_code=202 if task.status is TaskStatus.RUNNING else 200)
