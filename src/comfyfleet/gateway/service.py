"""The gateway's working parts, shared by its HTTP routes and its WebSocket: queuing a ComfyUI prompt as
a task, finding which client a prompt belongs to, and the queue length ComfyUI clients are told."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from starlette.requests import HTTPConnection

from comfyfleet.comfy.errors import MalformedPrompt
from comfyfleet.comfy.workflow import INPUT_FILE_NODES, MODEL_INPUTS, validate
from comfyfleet.config import Settings
from comfyfleet.dispatch.events import CANCEL_CHANNEL, TASKS_CHANNEL, EventBus, status_event
from comfyfleet.domain import NewTask, Task
from comfyfleet.domain.graph import validate_graph
from comfyfleet.gateway import shapes
from comfyfleet.gateway.catalogue import WorkerCatalogue
from comfyfleet.gateway.uploads import UploadStore, split_reference, strip_annotation
from comfyfleet.outputs import OutputStore
from comfyfleet.store import NotFound, Store, StoreError

logger = logging.getLogger(__name__)

_OWNER_CACHE_SIZE = 10_000
# Every socket's status frame reads the queue length; one read per tenant this often serves them all.
_QUEUE_REMAINING_TTL_S = 0.25
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._\- ]")


class PromptRejected(Exception):
    """``POST /prompt`` refused: ``body`` is ComfyUI's 400 answer."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body.get("error", {}).get("message", "invalid prompt"))
        self.body = body


@dataclass(frozen=True, slots=True)
class Queued:
    task: Task
    node_errors: dict[str, Any]


def _flat_input_name(reference: str, taken: set[str]) -> str:
    """A task-input name (no '/', safe characters) for an uploaded file referenced as ``reference``."""
    base = _UNSAFE_NAME_CHARS.sub("_", reference.replace("/", "__")).strip(". ") or "upload"
    if not base[0].isalnum():
        base = f"f{base}"
    base = base.replace("..", "_")[:150]
    name, counter = base, 1
    while name in taken:
        counter += 1
        stem, dot, suffix = base.rpartition(".")
        name = f"{stem}-{counter}.{suffix}" if dot and stem else f"{base}-{counter}"
    taken.add(name)
    return name


class Gateway:
    """One per application (``app.state.gateway``)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        outputs: OutputStore | None,
        bus: EventBus | None,
        catalogue: WorkerCatalogue | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.outputs = outputs
        self.bus = bus
        self.catalogue = catalogue or WorkerCatalogue(store, outputs=outputs)
        self.uploads = UploadStore(outputs) if outputs is not None else None
        self._owners: OrderedDict[str, str | None] = OrderedDict()  # task id -> client id (None: no client)
        self._remaining: dict[str | None, tuple[float, int]] = {}
        self._remaining_lock = asyncio.Lock()

    # -- who a prompt belongs to ----------------------------------------------------------------
    def remember(self, task_id: str, client_id: str | None) -> None:
        self._owners[task_id] = client_id
        self._owners.move_to_end(task_id)
        while len(self._owners) > _OWNER_CACHE_SIZE:
            self._owners.popitem(last=False)

    async def client_of(self, task_id: str) -> str | None:
        if task_id in self._owners:
            return self._owners[task_id]
        try:
            task = await self.store.get_task(task_id)
        except (NotFound, StoreError):
            return None
        client_id = shapes.client_id_of(task)
        self.remember(task_id, client_id)
        return client_id

    # -- queue length ---------------------------------------------------------------------------
    async def queue_remaining(self, tenant: str | None) -> int:
        """Pending plus running tasks the caller can see (ComfyUI's ``exec_info.queue_remaining``)."""
        async with self._remaining_lock:
            cached = self._remaining.get(tenant)
            now = time.monotonic()
            if cached is not None and now - cached[0] < _QUEUE_REMAINING_TTL_S:
                return cached[1]
            try:
                if tenant is None:
                    # Reads only the pending and running tasks (their indexes), however long the history.
                    value = sum(
                        pending + running for pending, running in (await self.store.demand_by_pool()).values()
                    )
                else:
                    metrics = await self.store.queue_metrics(tenant=tenant)
                    value = metrics.pending_tasks + metrics.running_tasks
            except StoreError:
                return cached[1] if cached else 0
            self._remaining[tenant] = (now, value)
            return value

    def forget_remaining(self) -> None:
        self._remaining.clear()

    # -- queuing a prompt -----------------------------------------------------------------------
    async def queue_prompt(self, body: Any, tenant: str) -> Queued:
        """Validate a ``POST /prompt`` body as ComfyUI would and store it as a task."""
        if not isinstance(body, dict):
            raise PromptRejected(
                shapes.prompt_error("invalid_prompt", "The request body must be a JSON object", "")
            )
        if "prompt" not in body:
            raise PromptRejected(shapes.prompt_error("no_prompt", "No prompt provided", ""))
        graph = body["prompt"]
        if not isinstance(graph, dict) or not graph:
            raise PromptRejected(
                shapes.prompt_error(
                    "invalid_prompt",
                    "The prompt must be a non-empty JSON object of nodes (the API format)",
                    "",
                )
            )
        prompt_id = body.get("prompt_id")
        if prompt_id is not None and not shapes.is_canonical_uuid(prompt_id):
            raise PromptRejected(
                shapes.prompt_error(
                    "invalid_prompt_id",
                    "prompt_id must be a valid UUID",
                    "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let the server generate one",
                )
            )
        limits = self.settings.limits
        if len(graph) > limits.max_nodes:
            raise PromptRejected(
                shapes.prompt_error(
                    "prompt_too_large",
                    f"The prompt has {len(graph)} nodes; this server accepts at most {limits.max_nodes}",
                    "",
                )
            )
        raw_extra = body.get("extra_data")
        extra: dict[str, Any] = raw_extra if isinstance(raw_extra, dict) else {}
        client_id = body.get("client_id") or extra.get("client_id")
        client_id = str(client_id)[:256] if client_id else None
        raw_options = extra.get("comfyfleet")
        options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
        priority = options.get("priority", 0)
        if (
            not isinstance(priority, int)
            or isinstance(priority, bool)
            or not limits.min_priority <= priority <= limits.max_priority
        ):
            raise PromptRejected(
                shapes.prompt_error(
                    "invalid_priority",
                    f"extra_data.comfyfleet.priority must be an integer from {limits.min_priority} to {limits.max_priority}",
                    "",
                )
            )
        if body.get("front") is True:
            priority = min(priority + 1, limits.max_priority)  # ahead of what waits at the same priority
        pool = options.get("pool")
        if pool is not None and not isinstance(pool, str):
            raise PromptRejected(
                shapes.prompt_error("invalid_pool", "extra_data.comfyfleet.pool must be a string", "")
            )

        task_id = prompt_id or str(uuid.uuid4())
        if prompt_id is not None:
            existing = await self._existing(prompt_id, tenant)
            if existing is not None:
                return Queued(existing, {})  # a retried POST: the prompt is already queued

        graph = copy.deepcopy(graph)
        targets = body.get("partial_execution_targets")
        if isinstance(targets, list) and targets:
            graph = shapes.prune_to_targets(graph, [str(target) for target in targets])
        inputs, attached = await self._attach_uploads(graph, tenant)
        node_errors = await self._validate(graph, attached, targets if isinstance(targets, list) else None)

        metadata: dict[str, Any] = {
            shapes.METADATA_KEY: {
                "client_id": client_id,
                "extra_data": {
                    k: v
                    for k, v in extra.items()
                    if k not in shapes.SENSITIVE_EXTRA_DATA and k != "client_id"
                },
            }
        }
        pnginfo = extra.get("extra_pnginfo")
        workflow = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
        workflow_id = (
            workflow.get("id") if isinstance(workflow, dict) and isinstance(workflow.get("id"), str) else None
        )
        dispatch = self.settings.dispatch
        new = NewTask(
            id=task_id,
            payload=graph,
            workflow_id=workflow_id[:256] if workflow_id else None,
            priority=priority,
            max_retries=dispatch.default_max_retries,
            timeout_s=dispatch.default_timeout_s,
            tenant=tenant,
            pool=pool,
            inputs=inputs or None,
            metadata=metadata,
        )
        self.remember(task_id, client_id)
        task, _ = await self.store.create_task(new)
        logger.info("gateway_prompt_queued task_id=%s client_id=%s", task.id, client_id)
        await self.announce(task, wake=True)
        return Queued(task, node_errors)

    async def _existing(self, task_id: str, tenant: str) -> Task | None:
        try:
            task = await self.store.get_task(task_id)
        except NotFound:
            return None
        if task.tenant != tenant:
            raise PromptRejected(
                shapes.prompt_error(
                    "invalid_prompt_id", "prompt_id is already in use", "choose another prompt_id, or omit it"
                )
            )
        return task

    async def _attach_uploads(
        self, graph: dict[str, Any], tenant: str
    ) -> tuple[list[dict[str, Any]], set[str]]:
        """Files of ``/upload/image`` that the graph reads become task inputs (the graph names them anew)."""
        if self.uploads is None:
            return [], set()
        inputs: list[dict[str, Any]] = []
        names: dict[str, str] = {}
        taken: set[str] = set()
        max_bytes = self.settings.limits.max_input_bytes
        for node in graph.values():
            if not isinstance(node, dict):
                continue
            wanted = INPUT_FILE_NODES.get(str(node.get("class_type", "")), ())
            node_inputs = node.get("inputs")
            if not wanted or not isinstance(node_inputs, dict):
                continue
            for input_name in wanted:
                reference = node_inputs.get(input_name)
                if not isinstance(reference, str) or not reference:
                    continue
                if reference not in names:
                    data = await self.uploads.load(tenant, reference)
                    if data is None:
                        continue  # not ours: perhaps a file the workers have (e.g. example.png)
                    if len(data) > max_bytes:
                        raise PromptRejected(
                            shapes.prompt_error(
                                "input_too_large",
                                f"{reference} is larger than the {max_bytes}-byte input limit",
                                "",
                            )
                        )
                    folder, file_name = split_reference(strip_annotation(reference)[0])
                    name = _flat_input_name(f"{folder}/{file_name}" if folder else file_name, taken)
                    names[reference] = name
                    inputs.append({"name": name, "data": base64.b64encode(data).decode("ascii")})
                node_inputs[input_name] = names[reference]
        return inputs, set(names.values())

    async def _validate(
        self, graph: dict[str, Any], attached: set[str], targets: list[Any] | None
    ) -> dict[str, Any]:
        object_info = await self.catalogue.object_info()
        if object_info is None:
            problems = validate_graph(graph, max_nodes=self.settings.limits.max_nodes)
            if problems:
                raise PromptRejected(shapes.structural_errors_body(graph, problems))
            return {}

        def accept(class_type: str, input_name: str, value: Any) -> bool:
            # Models may sit on another worker than the one whose catalogue lists them first, and
            # uploaded files travel with the task: neither is in this catalogue's lists.
            if input_name in MODEL_INPUTS:
                return True
            return input_name in INPUT_FILE_NODES.get(class_type, ()) and value in attached

        try:
            result = validate(graph, object_info, partial_execution_targets=targets, accept_combo=accept)
        except MalformedPrompt as exc:
            raise PromptRejected(shapes.prompt_error("invalid_prompt", str(exc), "")) from exc
        if not result.ok:
            body = result.response()
            scrub_tracebacks(body)
            raise PromptRejected(body)
        return result.node_errors

    # -- changes the gateway makes itself -------------------------------------------------------
    async def announce(self, task: Task, *, wake: bool = False, cancel: bool = False) -> None:
        """Tell live listeners (WebSockets, the dashboard) and the dispatcher about a change made here."""
        self.forget_remaining()
        if self.bus is not None:
            await self.bus.publish(status_event(task))
        channel = TASKS_CHANNEL if wake else CANCEL_CHANNEL if cancel else None
        if channel is not None:
            payload = json.dumps({"task_id": task.id}) if wake else task.id
            try:
                await self.store.notify(channel, payload)
            except StoreError as exc:
                # Durable already; a lost wake-up only waits for the dispatcher's safety poll.
                logger.warning("wakeup_failed channel=%s error=%s", channel, exc)


def scrub_tracebacks(body: dict[str, Any]) -> None:
    """Validation exceptions carry server tracebacks with paths; clients get the message only."""
    for node in (body.get("node_errors") or {}).values():
        for problem in node.get("errors", []) if isinstance(node, dict) else []:
            extra = problem.get("extra_info") if isinstance(problem, dict) else None
            if isinstance(extra, dict):
                extra.pop("traceback", None)


def gateway_of(connection: HTTPConnection) -> Gateway:
    app = connection.app
    gateway: Gateway | None = getattr(app.state, "gateway", None)
    if gateway is None:
        gateway = Gateway(
            app.state.settings,
            app.state.store,
            getattr(app.state, "outputs", None),
            getattr(app.state, "bus", None),
        )
        app.state.gateway = gateway
    return gateway
