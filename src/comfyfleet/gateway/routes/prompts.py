"""``/prompt``, ``/queue`` and ``/interrupt``: queuing prompts, the queue, and stopping prompts (ComfyUI)."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from fastapi import Request
from starlette.responses import Response

from comfyfleet.domain import Task, TaskStatus
from comfyfleet.gateway import shapes
from comfyfleet.gateway.access import PrincipalDep, json_body, parse_json_body, rejected
from comfyfleet.gateway.errors import PromptRejected
from comfyfleet.gateway.routes.group import RouteGroup, route
from comfyfleet.gateway.schemas import (
    EMPTY_OK,
    TOO_LARGE,
    PromptQueuedOut,
    QueueLengthOut,
    QueueOut,
    answers,
    refused,
)
from comfyfleet.http.auth import Principal
from comfyfleet.http.pages import ByteBudget, json_array
from comfyfleet.http.responses import JSONBody, json_bytes

QUEUE_CAP = 1000  # /queue lists at most this many pending prompts


class PromptRoutes(RouteGroup):
    @route(
        "POST",
        "/prompt",
        "Queue a prompt (ComfyUI)",
        response_model=PromptQueuedOut,
        responses=answers(refused("The prompt is refused: ComfyUI's error shape"), TOO_LARGE),
    )
    async def post_prompt(self, request: Request, principal: PrincipalDep) -> Response:
        """ComfyUI's `POST /prompt`: `{"prompt": <API graph>, "client_id"?, "prompt_id"?, "extra_data"?,
        "front"?, "partial_execution_targets"?}` → `{"prompt_id", "number", "node_errors"}`. The prompt runs
        as a task on whichever worker is free; `prompt_id` is the task's id. comfyfleet options go in
        `extra_data.comfyfleet` (`priority`, `pool`). A rejected graph gets ComfyUI's 400 shape."""
        return await self.queue(await request.body(), principal)

    async def queue(self, body: bytes, principal: Principal) -> Response:
        """The answer to a ``POST /prompt`` with this body (also given before the router: gateway.plain)."""
        try:
            submitted = await self.gateway.queue_prompt(parse_json_body(body), principal.tenant)
        except PromptRejected as exc:
            return rejected(exc)
        task = submitted.task
        return JSONBody({"prompt_id": task.id, "number": task.seq, "node_errors": submitted.node_errors})

    @route("GET", "/prompt", "Queue length (ComfyUI)", response_model=QueueLengthOut, responses=answers())
    async def get_prompt(self, principal: PrincipalDep) -> Response:
        remaining = await self.gateway.queue_remaining(principal.visible_tenant)
        return JSONBody({"exec_info": {"queue_remaining": remaining}})

    @route(
        "GET", "/queue", "Running and pending prompts (ComfyUI)", response_model=QueueOut, responses=answers()
    )
    async def get_queue(self, principal: PrincipalDep) -> Response:
        """Items are `[number, prompt_id, prompt, extra_data, outputs_to_execute]`; pending ones in the order
        they will run (at most 1,000 of each). An answer holds at most `limits.max_page_bytes` (8 MiB) of
        items: the running ones first, then the pending ones next to run."""
        running = [(task.seq, task.id) async for task in self._listed(principal, TaskStatus.RUNNING)]
        pending = [
            (-task.priority, task.seq, task.id) async for task in self._listed(principal, TaskStatus.PENDING)
        ]
        info = await self.gateway.catalogue.object_info()
        budget = ByteBudget(self.gateway.settings.limits.max_page_bytes)

        def item(task: Task) -> bytes:
            return json_bytes(shapes.queue_item(task, info))

        queue_running = await self.gateway.encoded([key[-1] for key in sorted(running)], item, budget)
        queue_pending = []
        if len(queue_running) == len(running):
            queue_pending = await self.gateway.encoded([key[-1] for key in sorted(pending)], item, budget)
        parts = [
            b'{"queue_running":',
            *json_array([piece for _, piece in queue_running]),
            b',"queue_pending":',
            *json_array([piece for _, piece in queue_pending]),
            b"}",
        ]
        return Response(b"".join(parts), media_type="application/json")

    def _listed(self, principal: Principal, status: TaskStatus) -> AsyncGenerator[Task, None]:
        return self.gateway.iter_tasks(principal, [status], QUEUE_CAP)

    @route(
        "POST",
        "/queue",
        "Delete pending prompts (ComfyUI)",
        response_class=Response,
        responses=answers(EMPTY_OK, refused("The body is not JSON"), TOO_LARGE),
    )
    async def post_queue(self, request: Request, principal: PrincipalDep) -> Response:
        """`{"delete": [prompt_id…]}` cancels those pending prompts; `{"clear": true}` cancels every pending
        prompt queued through this gateway. As in ComfyUI, a running prompt is left alone (use
        `/interrupt`)."""
        try:
            body = await json_body(request)
        except PromptRejected as exc:
            return rejected(exc)
        body = body if isinstance(body, dict) else {}
        targets: list[str] = []
        if body.get("clear") is True:
            async for task in self.gateway.iter_tasks(principal, [TaskStatus.PENDING], 100_000):
                if shapes.METADATA_KEY in (task.metadata or {}):
                    targets.append(task.id)
        for task_id in body.get("delete") or [] if isinstance(body.get("delete"), list) else []:
            deleted = await self.gateway.visible_task(str(task_id), principal)
            if deleted is not None and deleted.status is TaskStatus.PENDING:
                targets.append(deleted.id)
        # A task that started meanwhile is cancelled all the same: the delete was asked while it waited.
        await self.gateway.cancel(targets, principal)
        return Response(status_code=200)

    @route(
        "POST",
        "/interrupt",
        "Interrupt a running prompt (ComfyUI)",
        response_class=Response,
        responses=answers(EMPTY_OK, TOO_LARGE),
    )
    async def post_interrupt(self, request: Request, principal: PrincipalDep) -> Response:
        """`{"prompt_id": id}` stops that prompt if it is running (else nothing). Without a prompt_id, every
        running prompt queued through this gateway by the caller is stopped, as ComfyUI stops whatever it runs."""
        try:
            body = await json_body(request)
        except PromptRejected:
            body = None  # ComfyUI tolerates a bad body here: a global interrupt
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        targets: list[str] = []
        if prompt_id:
            task = await self.gateway.visible_task(str(prompt_id), principal)
            if task is not None and task.status is TaskStatus.RUNNING:
                targets.append(task.id)
        else:
            async for task in self.gateway.iter_tasks(principal, [TaskStatus.RUNNING], 10_000):
                if shapes.METADATA_KEY in (task.metadata or {}):
                    targets.append(task.id)
        await self.gateway.cancel(targets, principal)
        return Response(status_code=200)
