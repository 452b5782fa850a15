"""A ``POST /prompt`` body read as ComfyUI reads it, and turned into the task service's submission.

What is ComfyUI's wire format is checked here (a JSON object with a ``prompt``, a canonical ``prompt_id``,
an integer priority and a string pool in ``extra_data.comfyfleet``); what any submission is checked for
(its graph against the fleet, its priority's range, its pool) is the task service's business.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any

from comfyfleet.comfy.workflow import INPUT_FILE_NODES
from comfyfleet.config import Limits
from comfyfleet.domain.graph import looks_like_api_graph
from comfyfleet.gateway import shapes
from comfyfleet.gateway.errors import PromptRejected, comfyui_rejection
from comfyfleet.gateway.uploads import UploadStore, split_reference, strip_annotation
from comfyfleet.tasks import GraphCheck, Idempotency, OnReuse, Rejected, SubmitTask
from comfyfleet.tasks.checks import check_api_format

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._\- ]")


@dataclass(frozen=True, slots=True)
class PromptRequest:
    """The parts of a ``POST /prompt`` body comfyfleet uses."""

    graph: dict[str, Any]
    prompt_id: str | None
    client_id: str | None
    priority: int
    front: bool
    pool: str | None
    extra_data: dict[str, Any]
    targets: list[Any] | None

    def command(self, tenant: str, graph: dict[str, Any], inputs: list[dict[str, Any]]) -> SubmitTask:
        """The submission of this prompt, whose graph (pruned, its uploads renamed) is ``graph``."""
        return SubmitTask(
            payload=graph,
            tenant=tenant,
            priority=self.priority,
            workflow_id=self._workflow_id(),
            pool=self.pool,
            inputs=inputs or None,
            metadata={
                shapes.METADATA_KEY: {
                    "client_id": self.client_id,
                    "extra_data": {
                        key: value
                        for key, value in self.extra_data.items()
                        if key not in shapes.SENSITIVE_EXTRA_DATA and key != "client_id"
                    },
                }
            },
            # ComfyUI would run a prompt posted twice; a retried POST here gets the prompt already queued.
            idempotency=Idempotency(self.prompt_id, OnReuse.REPLAY, names_task=True)
            if self.prompt_id is not None
            else None,
            front=self.front,
            graph_check=GraphCheck.FLEET,
            partial_execution_targets=self.targets,
        )

    def _workflow_id(self) -> str | None:
        pnginfo = self.extra_data.get("extra_pnginfo")
        workflow = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
        workflow_id = workflow.get("id") if isinstance(workflow, dict) else None
        return workflow_id[:256] if isinstance(workflow_id, str) and workflow_id else None


def _refuse(kind: str, message: str, details: str = "") -> PromptRejected:
    return PromptRejected(shapes.prompt_error(kind, message, details))


def parse_prompt(body: Any, limits: Limits) -> PromptRequest:
    """Read a ``POST /prompt`` body; :class:`PromptRejected` when it breaks ComfyUI's wire format."""
    if not isinstance(body, dict):
        raise _refuse("invalid_prompt", "The request body must be a JSON object")
    if "prompt" not in body:
        # A workflow file posted as it is: say what ComfyUI would not (its type stays ComfyUI's no_prompt).
        try:
            check_api_format(body, location=())
        except Rejected as exc:
            raise comfyui_rejection(exc, {}) from None
        hint = (
            'the body is a workflow graph: send it as {"prompt": <the graph>}'
            if looks_like_api_graph(body)
            else ""
        )
        raise _refuse("no_prompt", "No prompt provided", hint)
    graph = body["prompt"]
    if not isinstance(graph, dict) or not graph:
        raise _refuse(
            "invalid_prompt", "The prompt must be a non-empty JSON object of nodes (the API format)"
        )
    prompt_id = body.get("prompt_id")
    if prompt_id is not None and not shapes.is_canonical_uuid(prompt_id):
        raise _refuse(
            "invalid_prompt_id",
            "prompt_id must be a valid UUID",
            "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let the server generate one",
        )
    raw_extra = body.get("extra_data")
    extra: dict[str, Any] = raw_extra if isinstance(raw_extra, dict) else {}
    client_id = body.get("client_id") or extra.get("client_id")
    raw_options = extra.get("comfyfleet")
    options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
    priority = options.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise _refuse(
            "invalid_priority",
            f"extra_data.comfyfleet.priority must be an integer from {limits.min_priority} to {limits.max_priority}",
        )
    pool = options.get("pool")
    if pool is not None and not isinstance(pool, str):
        raise _refuse("invalid_pool", "extra_data.comfyfleet.pool must be a string")
    targets = body.get("partial_execution_targets")
    return PromptRequest(
        graph=graph,
        prompt_id=prompt_id,
        client_id=str(client_id)[:256] if client_id else None,
        priority=priority,
        front=body.get("front") is True,
        pool=pool,
        extra_data=extra,
        targets=targets if isinstance(targets, list) else None,
    )


def graph_to_run(request: PromptRequest) -> dict[str, Any]:
    """A copy of the prompt's graph, pruned to its ``partial_execution_targets`` when it names some. Only the
    nodes and their ``inputs`` are copied (what attaching uploads changes): a deep copy would recurse once per
    level of a value's nesting, before the task service could refuse a value nested too deeply."""
    graph = {node_id: _node_copy(node) for node_id, node in request.graph.items()}
    if request.targets:
        graph = shapes.prune_to_targets(graph, [str(target) for target in request.targets])
    return graph


def _node_copy(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    copied = dict(node)
    if isinstance(node.get("inputs"), dict):
        copied["inputs"] = dict(node["inputs"])
    return copied


async def attach_uploads(
    graph: dict[str, Any], tenant: str, uploads: UploadStore, *, max_bytes: int
) -> list[dict[str, Any]]:
    """Files of ``/upload/image`` that the graph reads become task inputs (the graph names them anew)."""
    inputs: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    taken: set[str] = set()
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
                data = await uploads.load(tenant, reference)
                if data is None:
                    continue  # not ours: perhaps a file the workers have (e.g. example.png)
                if len(data) > max_bytes:
                    raise _refuse(
                        "input_too_large", f"{reference} is larger than the {max_bytes}-byte input limit"
                    )
                folder, file_name = split_reference(strip_annotation(reference)[0])
                name = _flat_input_name(f"{folder}/{file_name}" if folder else file_name, taken)
                names[reference] = name
                inputs.append({"name": name, "data": base64.b64encode(data).decode("ascii")})
            node_inputs[input_name] = names[reference]
    return inputs


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
