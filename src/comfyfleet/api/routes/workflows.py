"""``/api/v1/workflows/validate``: will this workflow run on the fleet? Asked before submitting it.

The graph is checked as a submission is (its shape), then as ComfyUI's ``POST /prompt`` would check it against
the fleet's node catalogue (``tasks/catalogue.py``: the workers up now, else the last seen), with the model
files of every worker: unknown node types (custom nodes not installed), missing required inputs, values out
of range or not in a list, and model files no worker has. Nothing is stored or sent to a worker.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from comfyfleet.api.schemas import WorkflowCheck, WorkflowValidationOut, error_responses
from comfyfleet.comfy.errors import MalformedPrompt
from comfyfleet.comfy.workflow import INPUT_FILE_NODES, model_references, node_types, validate
from comfyfleet.domain.graph import validate_graph
from comfyfleet.http.deps import ServicesDep
from comfyfleet.http.responses import JSONBody
from comfyfleet.tasks.checks import scrub_tracebacks

router = APIRouter(tags=["workflows"])


def _input_file(class_type: str, input_name: str, value: Any) -> bool:
    # Input files travel with the task (its ``inputs``) or already sit on the worker: not in any list.
    return input_name in INPUT_FILE_NODES.get(class_type, ())


@router.post(
    "/workflows/validate",
    response_model=WorkflowValidationOut,
    summary="Validate a workflow against the fleet",
    responses=error_responses(401, 413, 415, 422, 503),
)
async def validate_workflow(check: WorkflowCheck, services: ServicesDep) -> Response:
    """Check a workflow without running it: its structure, then, as ComfyUI's own validation does, every node
    type, input and model file against what the fleet's workers offer. Always 200 with the findings for a
    well-formed request; `valid` says whether anything is wrong."""
    graph = check.payload
    report: dict[str, Any] = {
        "valid": False,
        "checked_against": "structure",
        "errors": [],
        "error": None,
        "node_errors": {},
        "node_types": [],
        "missing_node_types": [],
        "models": [],
    }
    problems = validate_graph(graph, max_nodes=services.settings.limits.max_nodes)
    if problems:
        report["errors"] = [problem.as_dict() for problem in problems]
        return JSONBody(report)
    report["node_types"] = sorted(node_types(graph))
    report["models"] = [
        {"node_id": ref.node_id, "input_name": ref.input_name, "folder": ref.folder, "name": ref.name}
        for ref in model_references(graph)
    ]
    catalogue = await services.catalogue.object_info()
    if catalogue is None:
        report["valid"] = True
        return JSONBody(report)
    report["checked_against"] = "workers"
    report["missing_node_types"] = [name for name in report["node_types"] if name not in catalogue]
    try:
        # validate() coerces scalars in place, as ComfyUI does; the caller's graph is left alone.
        result = validate(copy.deepcopy(graph), catalogue, accept_combo=_input_file)
    except MalformedPrompt as exc:
        report["error"] = {"type": "invalid_prompt", "message": str(exc), "details": "", "extra_info": {}}
        return JSONBody(report)
    scrub_tracebacks(result.response())
    report["error"], report["node_errors"] = result.error, result.node_errors
    report["valid"] = result.ok and not result.node_errors
    return JSONBody(report)
