"""``/api/v1/tasks``: submit, list, read and cancel tasks (the seed's routes and fields)."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from starlette.responses import Response

from comfyfleet.api.auth import Principal, authenticate
from comfyfleet.api.deps import get_settings, get_start_estimator, get_store
from comfyfleet.api.errors import ApiError, InvalidInput
from comfyfleet.api.eta import StartEstimator
from comfyfleet.api.schemas import (
    JSONBody,
    TaskListOut,
    TaskOut,
    TaskSubmission,
    TaskUpdate,
    error_responses,
    task_json,
)
from comfyfleet.config import Settings
from comfyfleet.dispatch.events import CANCEL_CHANNEL, TASKS_CHANNEL, EventBus, Subscription, status_event
from comfyfleet.dispatch.inputs import InputError, check_input_spec
from comfyfleet.domain import TERMINAL_STATUSES, NewTask, Task, TaskStatus
from comfyfleet.domain.graph import validate_graph
from comfyfleet.store import Store, StoreError
from comfyfleet.webhooks import check_webhook, delivery_json

logger = logging.getLogger(__name__)

router = APIRouter(tags=["tasks"])

# The dispatcher's wake-up channels: a new runnable task, and a running task whose cancel was asked for.

MAX_LIST_LIMIT = 500
MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_WAIT_S = 600

PrincipalDep = Annotated[Principal, Depends(authenticate)]
StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
EstimatorDep = Annotated[StartEstimator, Depends(get_start_estimator)]
TaskId = Annotated[str, Path(description="The task's id (a UUID).", max_length=64)]


class _TaskIds:
    """Random (version 4) UUIDs for new tasks, from OS randomness fetched for 256 ids at a time.

    ``uuid.uuid4()`` asks the OS for 16 bytes per id; each such call lets go of the GIL, and taking it
    back from the store's writer thread cost more than the rest of the submission on a busy server.
    """

    _BATCH = 256

    def __init__(self) -> None:
        self._pool = b""
        self._next = 0

    def __call__(self) -> str:
        if self._next >= len(self._pool):
            self._pool = os.urandom(16 * self._BATCH)
            self._next = 0
        raw = self._pool[self._next : self._next + 16]
        self._next += 16
        return str(uuid.UUID(bytes=raw, version=4))


_new_task_id = _TaskIds()


def _known_pools(settings: Settings) -> set[str]:
    """Pool names and the labels pools carry: a task's ``pool`` may name either."""
    names = {pool.name for pool in settings.pools} | {
        label for pool in settings.pools for label in pool.labels
    }
    if settings.workers:
        names.add("default")  # the static workers given with --worker form the pool "default"
    return names


def _check_priority(priority: int, settings: Settings) -> None:
    limits = settings.limits
    if not limits.min_priority <= priority <= limits.max_priority:
        raise InvalidInput(
            f"priority must be an integer from {limits.min_priority} to {limits.max_priority}, got {priority}",
            [{"loc": ["body", "priority"], "message": "out of range", "type": "priority_out_of_range"}],
        )


def _check_submission(submission: TaskSubmission, settings: Settings) -> None:
    limits = settings.limits
    _check_priority(submission.priority, settings)
    problems = validate_graph(submission.payload, max_nodes=limits.max_nodes)
    if problems:
        first = problems[0].message
        more = (
            f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
            if len(problems) > 1
            else ""
        )
        raise InvalidInput(
            f"the payload is not a valid workflow graph: {first}{more}",
            [
                {
                    "loc": [
                        "body",
                        "payload",
                        *(part for part in (problem.node_id, problem.input_name) if part is not None),
                    ],
                    **problem.as_dict(),
                }
                for problem in problems
            ],
            error="invalid_graph",
        )
    for index, spec in enumerate(submission.inputs or []):
        try:
            check_input_spec(spec, max_bytes=limits.max_input_bytes)
        except InputError as exc:
            raise InvalidInput(
                str(exc),
                [{"loc": ["body", "inputs", index], "message": str(exc), "type": "invalid_input"}],
                error="invalid_input",
            ) from None
    if submission.webhook is not None:
        problem = check_webhook(submission.webhook)
        if problem:
            raise InvalidInput(
                problem,
                [{"loc": ["body", "webhook"], "message": problem, "type": "invalid_webhook"}],
                error="invalid_webhook",
            )
    if submission.pool is not None:
        known = _known_pools(settings)
        if known and submission.pool not in known:
            raise InvalidInput(
                f"unknown pool {submission.pool!r}; configured pools: {', '.join(sorted(known))}",
                [{"loc": ["body", "pool"], "message": "unknown pool", "type": "unknown_pool"}],
                error="unknown_pool",
            )


@router.post(
    "/tasks",
    status_code=201,
    response_model=TaskOut,
    summary="Submit a workflow",
    responses={
        200: {"model": TaskOut, "description": "This Idempotency-Key was used before: the original task."},
        **error_responses(400, 401, 413, 415, 422, 503),
    },
)
async def submit_task(
    request: Request,
    submission: TaskSubmission,
    principal: PrincipalDep,
    store: StoreDep,
    settings: SettingsDep,
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
    _check_submission(submission, settings)
    dispatch = settings.dispatch
    new = NewTask(
        id=_new_task_id(),
        payload=submission.payload,
        workflow_id=submission.workflow_id,
        priority=submission.priority,
        max_retries=submission.max_retries
        if submission.max_retries is not None
        else dispatch.default_max_retries,
        timeout_s=submission.timeout_s if submission.timeout_s is not None else dispatch.default_timeout_s,
        tenant=principal.tenant,
        idempotency_key=idempotency_key,
        pool=submission.pool,
        inputs=submission.inputs,
        webhook=submission.webhook,
        metadata=submission.metadata,
    )
    task, created = await store.create_task(new)
    if not created and not _same_request(new, task):
        # The key names one request: a retry must send the same one, or it would silently get another's task.
        raise ApiError(
            422,
            "idempotency_key_reused",
            f"Idempotency-Key {idempotency_key!r} was already used for a different request (task {task.id}); "
            "send the same request to get that task back, or use a new key",
            {"task_id": task.id},
        )
    bus: EventBus | None = getattr(request.app.state, "bus", None)
    if created and bus is not None:
        # Live listeners (the dashboard's task list, ComfyUI sockets' queue length) see it arrive.
        await bus.publish(status_event(task))
    if wait and bus is not None:
        # Subscribed before the dispatcher is woken, so the end of the task cannot be missed.
        with bus.subscribe(task_id=task.id) as subscription:
            if created:
                await _wake(store, TASKS_CHANNEL, f'{{"task_id":"{task.id}"}}')
            task = await _wait_until_ended(store, task, subscription, wait)
    elif created:
        await _wake(store, TASKS_CHANNEL, f'{{"task_id":"{task.id}"}}')
    headers = {"Location": f"/api/v1/tasks/{task.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return JSONBody(task_json(task), status_code=201 if created else 200, headers=headers)


_REQUEST_FIELDS = (
    "payload",
    "workflow_id",
    "priority",
    "max_retries",
    "timeout_s",
    "pool",
    "inputs",
    "webhook",
    "metadata",
)


def _same_request(new: NewTask, task: Task) -> bool:
    return all(getattr(new, name) == getattr(task, name) for name in _REQUEST_FIELDS)


async def _wait_until_ended(store: Store, task: Task, subscription: Subscription, wait_s: float) -> Task:
    deadline = asyncio.get_running_loop().time() + wait_s
    task = await store.get_task(task.id)
    while task.status not in TERMINAL_STATUSES:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            break
        event = await subscription.get(wait_s=remaining)
        if event is None or (event.type == "status" and event.data.get("status") in TERMINAL_STATUSES):
            task = await store.get_task(task.id)
    return task


async def _wake(store: Store, channel: str, payload: str) -> None:
    # The change is already durable; a lost wake-up only delays the dispatcher until its safety poll,
    # so it must not turn a stored submission or cancel into an error.
    try:
        await store.notify(channel, payload)
    except StoreError as exc:
        logger.warning("wakeup_failed channel=%s error=%s", channel, exc)


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


@router.get(
    "/tasks",
    response_model=TaskListOut,
    summary="List tasks",
    responses=error_responses(401, 422, 503),
)
async def list_tasks(
    principal: PrincipalDep,
    store: StoreDep,
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
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT, description="Page size.")] = 50,
    cursor: Annotated[
        str | None, Query(description="The next_cursor of the previous page.", max_length=200)
    ] = None,
) -> Response:
    """Tasks newest first, in pages: follow `next_cursor` until it is null. A tenant sees its own tasks."""
    page = await store.list_tasks(
        tenant=principal.visible_tenant,
        statuses=_parse_statuses(status),
        workflow_id=workflow_id,
        limit=limit,
        cursor=cursor,
    )
    tasks = [task_json(task) for task in page.tasks]
    return JSONBody({"tasks": tasks, "count": len(tasks), "next_cursor": page.next_cursor})


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
    request: Request,
    principal: PrincipalDep,
    store: StoreDep,
    settings: SettingsDep,
    estimator: EstimatorDep,
) -> Response:
    """Move a waiting task up or down the queue: `{"priority": N}`. Among equal priorities it keeps its
    submission order. The answer has its new `queue_position`. A task that already started is a 409."""
    _check_priority(update.priority, settings)
    task = await store.set_priority(
        checked_task_id(task_id), update.priority, tenant=principal.visible_tenant
    )
    logger.info("task_priority_changed task_id=%s priority=%d", task.id, task.priority)
    bus: EventBus | None = getattr(request.app.state, "bus", None)
    if bus is not None:
        await bus.publish(status_event(task))  # live listeners re-read their queue positions
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
async def cancel_task(
    task_id: TaskId, request: Request, principal: PrincipalDep, store: StoreDep
) -> Response:
    """Cancel a task. A pending task is cancelled at once (200). A running one is stopped on its worker
    (202 with `cancel_requested: true`). A task that already ended is a 409."""
    task = await store.cancel_task(checked_task_id(task_id), tenant=principal.visible_tenant)
    if task.status is TaskStatus.RUNNING:
        logger.info("task_cancel_requested task_id=%s", task.id)
        await _wake(store, CANCEL_CHANNEL, task.id)
        return JSONBody(task_json(task), status_code=202)
    if task.status is not TaskStatus.CANCELLED:
        # The store resolved the race differently (e.g. the task ended meanwhile); say so plainly.
        raise ApiError(409, "conflict", f"task {task.id} is already {task.status.value}")
    logger.info("task_cancelled task_id=%s", task.id)
    bus: EventBus | None = getattr(request.app.state, "bus", None)
    if bus is not None:
        # No dispatcher saw this one: tell live listeners (event streams, dashboard, ComfyUI sockets) here.
        await bus.publish(status_event(task))
    return JSONBody(task_json(task))
