"""ComfyUI-side inspection and validation of API-format graphs, over the graph model of ``domain/graph.py``.

Inspection reads what a worker must have for a graph: node types, model files, input files, output nodes.
:func:`validate` follows ComfyUI 0.33's ``validate_prompt`` / ``validate_inputs`` step by step (the node
checks are in ``comfy/validation.py``), so that the emulator and a control plane pre-validating against a
worker's ``object_info`` produce the same ``error`` and ``node_errors`` (types, messages, details,
extra_info) as the real server.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from comfyfleet.comfy.errors import MalformedPrompt
from comfyfleet.comfy.validation import ComboAcceptor, CustomValidator, NodeValidator, Reasons
from comfyfleet.domain import graph as graph_model

# Loader inputs that name a model file, and the model folder each one reads from.
MODEL_INPUTS: dict[str, str] = {
    "ckpt_name": "checkpoints",
    "unet_name": "diffusion_models",
    "lora_name": "loras",
    "vae_name": "vae",
    "clip_name": "text_encoders",
    "clip_name1": "text_encoders",
    "clip_name2": "text_encoders",
    "clip_name3": "text_encoders",
    "clip_name4": "text_encoders",
    "control_net_name": "controlnet",
    "style_model_name": "style_models",
    "gligen_name": "gligen",
    "upscale_model_name": "upscale_models",
    "hypernetwork_name": "hypernetworks",
    "photomaker_model_name": "photomaker",
}

# Nodes whose combo input names a file in the server's input folder.
INPUT_FILE_NODES: dict[str, tuple[str, ...]] = {
    "LoadImage": ("image",),
    "LoadImageMask": ("image",),
    "LoadImageOutput": ("image",),
    "LoadAudio": ("audio",),
    "LoadVideo": ("file",),
}

Graph = Mapping[str, Any]
ObjectInfo = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ModelReference:
    node_id: str
    class_type: str
    input_name: str
    folder: str
    name: str


def _nodes(graph: Graph) -> list[tuple[str, Mapping[str, Any]]]:
    try:
        return list(graph_model.nodes(graph))
    except graph_model.NotAGraph as exc:
        raise MalformedPrompt(str(exc)) from exc


def _inputs(graph: Graph) -> Iterator[graph_model.Input]:
    _nodes(graph)  # the same MalformedPrompt for a graph that cannot be walked
    return graph_model.inputs(graph)


def node_types(graph: Graph) -> set[str]:
    """Every ``class_type`` the graph uses."""
    return {str(node["class_type"]) for _, node in _nodes(graph) if isinstance(node.get("class_type"), str)}


def model_references(graph: Graph) -> list[ModelReference]:
    """Model files named by loader inputs (``ckpt_name``, ``unet_name``, ``lora_name``…)."""
    return [
        ModelReference(item.node_id, item.class_type, item.name, MODEL_INPUTS[item.name], item.value)
        for item in _inputs(graph)
        if item.name in MODEL_INPUTS and isinstance(item.value, str) and item.value
    ]


def model_names(graph: Graph) -> set[str]:
    return {reference.name for reference in model_references(graph)}


def input_files(graph: Graph) -> list[str]:
    """Files the graph reads from the server's input folder (as written, e.g. ``"sub/name.png"``)."""
    files: list[str] = []
    for item in _inputs(graph):
        reads_a_file = item.name in INPUT_FILE_NODES.get(item.class_type, ())
        if reads_a_file and isinstance(item.value, str) and item.value and item.value not in files:
            files.append(item.value)
    return files


def output_nodes(graph: Graph, object_info: ObjectInfo) -> list[str]:
    """Ids of the graph's output nodes (``output_node: true`` in ``object_info``)."""
    return [node_id for node_id, node in _nodes(graph) if _is_output(object_info, node.get("class_type"))]


def _is_output(object_info: ObjectInfo, class_type: object) -> bool:
    info = object_info.get(class_type) if isinstance(class_type, str) else None
    return isinstance(info, Mapping) and info.get("output_node") is True


# --- validation ------------------------------------------------------------------------------------


@dataclass(slots=True)
class ValidationResult:
    """``ok`` is ComfyUI's ``valid[0]``: at least one output validated. ``node_errors`` may be non-empty
    even then (partial validity: the bad outputs are skipped)."""

    ok: bool
    error: dict[str, Any] | None
    good_outputs: list[str]
    node_errors: dict[str, Any] = field(default_factory=dict)

    def response(self) -> dict[str, Any]:
        """The HTTP 400 body ComfyUI sends for an invalid prompt."""
        return {"error": self.error, "node_errors": self.node_errors}


def validate(
    prompt: Graph,
    object_info: ObjectInfo,
    *,
    partial_execution_targets: Iterable[str] | None = None,
    custom_validators: Mapping[str, Mapping[str, CustomValidator]] | None = None,
    accept_combo: ComboAcceptor | None = None,
) -> ValidationResult:
    """Validate ``prompt`` against ``object_info`` the way ComfyUI's ``POST /prompt`` does.

    Scalar inputs are coerced in place (``"8"`` becomes ``8`` for an INT), as upstream does.
    ``custom_validators[class_type][input_name](input_name, inputs)`` plays a node's VALIDATE_INPUTS
    (return True, False or an error text). Raises :class:`MalformedPrompt` where the real server
    answers a bare 500 (the prompt or a node is not a JSON object).
    """
    nodes = dict(_nodes(prompt))
    unknown = _unknown_node_type(prompt, nodes, object_info)
    if unknown is not None:
        return ValidationResult(False, unknown, [], {})
    targets = None if partial_execution_targets is None else {str(t) for t in partial_execution_targets}
    outputs = [
        node_id
        for node_id, node in nodes.items()
        if _is_output(object_info, node["class_type"]) and (targets is None or node_id in targets)
    ]
    if not outputs:
        error = {
            "type": "prompt_no_outputs",
            "message": "Prompt has no outputs",
            "details": "",
            "extra_info": {},
        }
        return ValidationResult(False, error, [], {})
    validator = NodeValidator(prompt, object_info, custom_validators or {}, accept_combo)
    good_outputs: list[str] = []
    failed: list[Reasons] = []
    node_errors: dict[str, Any] = {}
    for output_id in outputs:
        valid, reasons = validator.validate_output(output_id)
        if valid:
            good_outputs.append(output_id)
            continue
        failed.append(reasons)
        _collect_node_errors(validator, nodes, output_id, node_errors)
    if not good_outputs:
        return ValidationResult(False, _outputs_failed(failed), [], node_errors)
    return ValidationResult(True, None, good_outputs, node_errors)


def _unknown_node_type(
    prompt: Graph, nodes: Mapping[str, Mapping[str, Any]], object_info: ObjectInfo
) -> dict[str, Any] | None:
    """Upstream's ``missing_node_type`` for the first node without a known ``class_type``, before anything else."""
    for node_id, node in nodes.items():
        title = _node_title(prompt, node_id)
        if "class_type" not in node:
            message = f"Node '{title}' has no class_type. The workflow may be corrupted or a custom node may be missing."
            class_type = None
        elif not isinstance(
            object_info.get(node["class_type"]) if isinstance(node["class_type"], str) else None, Mapping
        ):
            class_type = node["class_type"]
            message = f"Node '{class_type}' not found. The custom node may not be installed."
        else:
            continue
        return {
            "type": "missing_node_type",
            "message": message,
            "details": f"Node ID '#{node_id}'",
            "extra_info": {"node_id": node_id, "class_type": class_type, "node_title": title},
        }
    return None


def _collect_node_errors(
    validator: NodeValidator,
    nodes: Mapping[str, Mapping[str, Any]],
    output_id: str,
    node_errors: dict[str, Any],
) -> None:
    for node_id, (node_valid, node_reasons, _) in validator.validated.items():
        # Downstream nodes of a bad node are invalid without reasons of their own: upstream leaves
        # them out of node_errors so that only the real culprit is reported.
        if node_valid is not True and node_reasons:
            if node_id not in node_errors:
                node_errors[node_id] = {
                    "errors": node_reasons,
                    "dependent_outputs": [],
                    "class_type": nodes[node_id]["class_type"] if node_id in nodes else None,
                }
            node_errors[node_id]["dependent_outputs"].append(output_id)


def _outputs_failed(failed: list[Reasons]) -> dict[str, Any]:
    details = "\n".join(
        f"{reason['message']}: {reason['details']}" for reasons in failed for reason in reasons
    )
    return {
        "type": "prompt_outputs_failed_validation",
        "message": "Prompt outputs failed validation",
        "details": details,
        "extra_info": {},
    }


def _node_title(graph: Graph, node_id: str) -> str:
    node = graph.get(node_id)
    if isinstance(node, Mapping):
        meta = node.get("_meta")
        if isinstance(meta, Mapping) and meta.get("title"):
            return str(meta["title"])
        if node.get("class_type"):
            return str(node["class_type"])
    return node_id
