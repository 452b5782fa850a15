"""``POST /api/v1/tasks`` answered without FastAPI's per-request machinery when the request is a plain one.

Submissions are the API's hot path, and FastAPI's request handling (the ``Request`` object, two exit stacks,
the dependency solver, parameter and body validation, the response model plumbing) cost as much CPU as the
task service and the store together. :class:`SubmitRoute` is the route FastAPI registers and documents as
usual (the OpenAPI document does not change), but it handles a request itself when nothing about it needs
FastAPI's wording: a JSON body that :class:`TaskSubmission` accepts, an ``Idempotency-Key`` within its limits
and no query string but a plain ``?wait=<seconds>`` within its bounds. Everything else (a body that is not JSON
or not valid, another media type, any other query) is handed, body and all, to FastAPI's handler, which answers exactly as it always did. Refusals of the task
service and the store are raised from here as from the route function, and the same exception handlers word
them. The task is stored (committed) by the task service before the answer is sent, as on the slow path.
:class:`PlainSubmissions` answers plain submissions in the same way before the router looks for the route.
With FastAPI's own telemetry on (OpenTelemetry configured), FastAPI answers every request itself.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from fastapi.routing import APIRoute
from pydantic_core import from_json
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comfyfleet.api.schemas import TaskSubmission
from comfyfleet.http.auth import principal_from
from comfyfleet.http.deps import services_of
from comfyfleet.http.plain import before_router, read_body
from comfyfleet.http.responses import JSONBody, json_bytes
from comfyfleet.http.wire import task_json
from comfyfleet.tasks import Idempotency, OnReuse, SubmitTask

if TYPE_CHECKING:
    from comfyfleet.tasks import Submitted

MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_WAIT_S = 600
# The one query a plain submission may carry: ``wait=`` with a plain decimal number of seconds.
_PLAIN_WAIT = re.compile(rb"wait=(\d{1,4}(?:\.\d{1,6})?)")


def submission_command(submission: TaskSubmission, tenant: str, idempotency_key: str | None) -> SubmitTask:
    """The task service's command for a submission received through the REST API."""
    return SubmitTask(
        payload=submission.payload,
        tenant=tenant,
        priority=submission.priority,
        workflow_id=submission.workflow_id,
        max_retries=submission.max_retries,
        timeout_s=submission.timeout_s,
        pool=submission.pool,
        inputs=submission.inputs,
        webhook=submission.webhook,
        metadata=submission.metadata,
        models=submission.models,
        idempotency=Idempotency(idempotency_key, OnReuse.REPLAY_SAME_REQUEST)
        if idempotency_key is not None
        else None,
    )


def submitted_response(submitted: Submitted) -> JSONBody:
    """201 with the new task, or 200 with the original one when an ``Idempotency-Key`` was used before."""
    task = submitted.task
    headers = {"Location": f"/api/v1/tasks/{task.id}"}
    if not submitted.created:
        headers["Idempotent-Replayed"] = "true"
    return JSONBody(task_json(task), status_code=201 if submitted.created else 200, headers=headers)


class SubmitRoute(APIRoute):
    """The route of ``POST /api/v1/tasks``: plain submissions are answered here, the rest by FastAPI."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "POST" and not scope.get(_TRIED):
            received: list[Message] = []
            if await answer_plain_submission(scope, receive, send, received):
                return
            receive = _replaying(received, receive)
        await super().handle(scope, receive, send)


class PlainSubmissions:
    """Router middleware (``app.router.middleware_stack``): a plain ``POST`` to ``path`` is answered before
    the router looks for its route, which costs as much as the rest of the HTTP edge's own work; anything
    else, and a request that turns out not to be plain (with the body already read), goes on to the router.

    It sits inside the application's exception middleware, so a refusal raised while answering is worded by
    the same handlers as when the route answers it. With FastAPI's own telemetry on, every request goes
    through the router, which names the route in the request's span.
    """

    def __init__(self, app: ASGIApp, path: str) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if before_router(scope, "POST") and scope["path"] == self.path:
            received: list[Message] = []
            if await answer_plain_submission(scope, receive, send, received):
                return
            scope[_TRIED] = True
            receive = _replaying(received, receive)
        await self.app(scope, receive, send)


# Set in a request's scope once it was found not to be plain, so the route does not read it a second time.
_TRIED = "comfyfleet.not_plain"


async def answer_plain_submission(
    scope: Scope, receive: Receive, send: Send, received: list[Message]
) -> bool:
    """Answer ``scope`` if it is a plain submission (see the module's description) and return True; else
    return False without answering, with the messages read so far in ``received``."""
    if "fastapi.telemetry" in scope:
        return False
    wait_s: float | None = None
    if query := scope["query_string"]:
        plain_wait = _PLAIN_WAIT.fullmatch(query)
        if plain_wait is None or (wait_s := float(plain_wait[1])) > MAX_WAIT_S:
            return False
    request = await _plain_request(scope, receive, received)
    if request is None:
        return False
    submission, idempotency_key = request
    connection = HTTPConnection(scope)
    services = services_of(connection)
    principal = principal_from(connection, services.keyring)
    command = submission_command(submission, principal.tenant, idempotency_key)
    await _send_submitted(send, await services.tasks.submit(command, wait_s=wait_s))
    return True


async def _send_submitted(send: Send, submitted: Submitted) -> None:
    """What :func:`submitted_response` sends (the same status, headers in the same order and body), without
    building a response object."""
    task = submitted.task
    body = json_bytes(task_json(task))
    headers = [(b"location", f"/api/v1/tasks/{task.id}".encode("latin-1"))]
    if not submitted.created:
        headers.append((b"idempotent-replayed", b"true"))
    headers += [(b"content-length", str(len(body)).encode("latin-1")), (b"content-type", b"application/json")]
    status = 201 if submitted.created else 200
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _plain_request(
    scope: Scope, receive: Receive, received: list[Message]
) -> tuple[TaskSubmission, str | None] | None:
    """The submission and its idempotency key when FastAPI would accept the request as they are, else None
    (then FastAPI's handler answers it). ``received`` keeps every message read, for that handler."""
    content_type: bytes | None = None
    idempotency_keys: list[bytes] = []
    for name, value in scope["headers"]:
        if name == b"content-type":
            if content_type is not None:
                return None
            content_type = value
        elif name == b"idempotency-key":
            idempotency_keys.append(value)
    if content_type is None or content_type.lower() != b"application/json" or len(idempotency_keys) > 1:
        return None
    idempotency_key = idempotency_keys[0].decode("latin-1") if idempotency_keys else None
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        return None
    body = await read_body(receive, received)
    if not body:
        return None
    try:
        # pydantic-core's reader is twice as quick as json.loads (which FastAPI's handler uses), and what it
        # accepts it reads to the same values; what it refuses (a lone surrogate, a UTF-16 body...) json.loads
        # may accept, so that goes to FastAPI's handler.
        data: Any = from_json(body)
        submission = TaskSubmission.model_validate(data)
    except Exception:
        return None
    return submission, idempotency_key


def _replaying(received: list[Message], receive: Receive) -> Receive:
    """``receive`` that first gives back what was already read."""

    async def replay() -> Message:
        return received.pop(0) if received else await receive()

    return replay
