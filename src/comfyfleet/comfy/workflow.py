"""Inspect and validate API-format ComfyUI graphs.

An API-format graph is ``{"<node id>": {"class_type": str, "inputs": {...}, "_meta": {...}}}``; a link
is ``["<source node id>", <output index>]``.

:func:`validate` follows ComfyUI 0.33's ``validate_prompt`` / ``validate_inputs`` step by step, so that
the emulator and a control plane pre-validating against a worker's ``object_info`` produce the same
``error`` and ``node_errors`` (types, messages, details, extra_info) as the real server.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from comfyfleet.comfy.errors import MalformedPrompt

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
class Link:
    source_node: str
    source_output: int
    target_node: str
    target_input: str


@dataclass(frozen=True, slots=True)
class ModelReference:
    node_id: str
    class_type: str
    input_name: str
    folder: str
    name: str


def _nodes(graph: Graph) -> Iterable[tuple[str, Mapping[str, Any]]]:
    if not isinstance(graph, Mapping):
        raise MalformedPrompt("the prompt must be a JSON object of nodes")
    for node_id, node in graph.items():
        if not isinstance(node, Mapping):
            raise MalformedPrompt(f"node {node_id!r} must be a JSON object")
        yield str(node_id), node


def _inputs(node: Mapping[str, Any]) -> Mapping[str, Any]:
    inputs = node.get("inputs")
    return inputs if isinstance(inputs, Mapping) else {}


def is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


def node_types(graph: Graph) -> set[str]:
    """Every ``class_type`` the graph uses."""
    return {str(node["class_type"]) for _, node in _nodes(graph) if isinstance(node.get("class_type"), str)}


def links(graph: Graph) -> list[Link]:
    """Every well-formed link, in node then input order."""
    found = []
    for node_id, node in _nodes(graph):
        for name, value in _inputs(node).items():
            if is_link(value):
                found.append(Link(value[0], value[1], node_id, str(name)))
    return found


def model_references(graph: Graph) -> list[ModelReference]:
    """Model files named by loader inputs (``ckpt_name``, ``unet_name``, ``lora_name``…)."""
    found = []
    for node_id, node in _nodes(graph):
        class_type = str(node.get("class_type", ""))
        for name, value in _inputs(node).items():
            folder = MODEL_INPUTS.get(str(name))
            if folder and isinstance(value, str) and value:
                found.append(ModelReference(node_id, class_type, str(name), folder, value))
    return found


def model_names(graph: Graph) -> set[str]:
    return {reference.name for reference in model_references(graph)}


def input_files(graph: Graph) -> list[str]:
    """Files the graph reads from the server's input folder (as written, e.g. ``"sub/name.png"``)."""
    files: list[str] = []
    for _, node in _nodes(graph):
        for name in INPUT_FILE_NODES.get(str(node.get("class_type", "")), ()):
            value = _inputs(node).get(name)
            if isinstance(value, str) and value and value not in files:
                files.append(value)
    return files


def output_nodes(graph: Graph, object_info: ObjectInfo) -> list[str]:
    """Ids of the graph's output nodes (``output_node: true`` in ``object_info``)."""
    return [
        node_id
        for node_id, node in _nodes(graph)
        if isinstance(object_info.get(str(node.get("class_type"))), Mapping)
        and object_info[str(node.get("class_type"))].get("output_node") is True
    ]


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


# (input_name, inputs of the node) -> True when fine, else False or an error text. Plays VALIDATE_INPUTS.
CustomValidator = Callable[[str, Mapping[str, Any]], "bool | str"]
# (class_type, input_name, value) -> True to accept a combo value that is not in the list.
ComboAcceptor = Callable[[str, str, Any], bool]


def _node_title(graph: Graph, node_id: str) -> str:
    node = graph.get(node_id)
    if isinstance(node, Mapping):
        meta = node.get("_meta")
        if isinstance(meta, Mapping) and meta.get("title"):
            return str(meta["title"])
        if node.get("class_type"):
            return str(node["class_type"])
    return node_id


def _full_type_name(exc: BaseException) -> str:
    module = type(exc).__module__
    return type(exc).__qualname__ if module in ("builtins", None) else f"{module}.{type(exc).__qualname__}"


def _input_spec(info: Mapping[str, Any], name: str) -> tuple[Any, str, dict[str, Any]]:
    inputs = info.get("input", {})
    for category in ("required", "optional"):
        spec = inputs.get(category, {}).get(name)
        if spec is not None:
            input_type = spec[0]
            extra = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
            if input_type == "COMBO" and isinstance(extra.get("options"), list):
                input_type = extra["options"]
            return input_type, category, extra
    raise KeyError(name)


def _types_match(received: str, expected: Any) -> bool:
    if isinstance(expected, list):  # a combo fed by a link (a primitive or a combo output)
        return True
    if received == expected or received == "*" or expected == "*":
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    return not {part.strip() for part in received.split(",")}.isdisjoint(
        part.strip() for part in expected.split(",")
    )


class _Validator:
    def __init__(
        self,
        prompt: Graph,
        object_info: ObjectInfo,
        custom: Mapping[str, Mapping[str, CustomValidator]],
        accept_combo: ComboAcceptor | None,
    ) -> None:
        self.prompt = prompt
        self.object_info = object_info
        self.custom = custom
        self.accept_combo = accept_combo
        self.validated: dict[str, tuple[bool, list[dict[str, Any]], str]] = {}
        self.stack: list[str] = []

    def validate_inputs(self, unique_id: str) -> tuple[bool, list[dict[str, Any]], str]:
        if unique_id in self.validated:
            return self.validated[unique_id]
        if unique_id in self.stack:
            cycle = [*self.stack[self.stack.index(unique_id) :], unique_id]
            details = " -> ".join(f"{node} ({self.prompt[node]['class_type']})" for node in cycle)
            reasons = [
                {
                    "type": "dependency_cycle",
                    "message": "Dependency cycle detected",
                    "details": details,
                    "extra_info": {"node_id": unique_id, "cycle_nodes": cycle[:-1]},
                }
            ]
            result = (False, reasons, unique_id)
            self.validated[unique_id] = result
            return result
        self.stack.append(unique_id)
        try:
            return self._validate_node(unique_id)
        finally:
            self.stack.pop()

    def _validate_node(self, unique_id: str) -> tuple[bool, list[dict[str, Any]], str]:
        node = self.prompt[unique_id]
        inputs = node["inputs"]
        class_type = node["class_type"]
        info = self.object_info[class_type]
        declared = info.get("input", {})
        valid_inputs = list(declared.get("required", {})) + [
            name for name in declared.get("optional", {}) if name not in declared.get("required", {})
        ]
        errors: list[dict[str, Any]] = []
        valid = True
        for name in valid_inputs:
            input_type, category, extra = _input_spec(info, name)
            if name not in inputs:
                if category == "required":
                    errors.append(
                        {
                            "type": "required_input_missing",
                            "message": "Required input is missing",
                            "details": f"{name}",
                            "extra_info": {"input_name": name},
                        }
                    )
                continue
            value = inputs[name]
            input_config = [input_type, extra]
            if isinstance(value, list):
                if len(value) != 2:
                    errors.append(
                        {
                            "type": "bad_linked_input",
                            "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                            "details": f"{name}",
                            "extra_info": {
                                "input_name": name,
                                "input_config": input_config,
                                "received_value": value,
                            },
                        }
                    )
                    continue
                source_id = value[0]
                # A missing source node or output index raises, exactly like upstream: the exception
                # becomes ``exception_during_validation`` on the output being validated.
                source_class = self.prompt[source_id]["class_type"]
                received_type = tuple(self.object_info[source_class]["output"])[value[1]]
                if not _types_match(received_type, input_type):
                    errors.append(
                        {
                            "type": "return_type_mismatch",
                            "message": "Return type mismatch between linked nodes",
                            "details": f"{name}, received_type({received_type}) mismatch input_type({input_type})",
                            "extra_info": {
                                "input_name": name,
                                "input_config": input_config,
                                "received_type": received_type,
                                "linked_node": value,
                            },
                        }
                    )
                    continue
                try:
                    inner = self.validate_inputs(source_id)
                except Exception as exc:
                    valid = False
                    self.validated[source_id] = (
                        False,
                        [
                            {
                                "type": "exception_during_inner_validation",
                                "message": "Exception when validating inner node",
                                "details": str(exc),
                                "extra_info": {
                                    "input_name": name,
                                    "input_config": input_config,
                                    "exception_message": str(exc),
                                    "exception_type": _full_type_name(exc),
                                    "traceback": traceback.format_tb(exc.__traceback__),
                                    "linked_node": value,
                                },
                            }
                        ],
                        source_id,
                    )
                    continue
                if inner[0] is False:
                    valid = False
                continue

            try:
                if isinstance(value, Mapping) and "__value__" in value:
                    value = value["__value__"]
                    inputs[name] = value
                if input_type == "INT":
                    value = int(value)
                    inputs[name] = value
                elif input_type == "FLOAT":
                    value = float(value)
                    inputs[name] = value
                elif input_type == "STRING":
                    value = str(value)
                    inputs[name] = value
                elif input_type == "BOOLEAN":
                    value = bool(value)
                    inputs[name] = value
            except Exception as exc:
                errors.append(
                    {
                        "type": "invalid_input_type",
                        "message": f"Failed to convert an input value to a {input_type} value",
                        "details": f"{name}, {value}, {exc}",
                        "extra_info": {
                            "input_name": name,
                            "input_config": input_config,
                            "received_value": value,
                            "exception_message": str(exc),
                        },
                    }
                )
                continue

            if name in self.custom.get(class_type, {}):
                continue  # a node with its own VALIDATE_INPUTS for this input skips the generic checks
            if "min" in extra and value < extra["min"]:
                errors.append(
                    {
                        "type": "value_smaller_than_min",
                        "message": f"Value {value} smaller than min of {extra['min']}",
                        "details": f"{name}",
                        "extra_info": {
                            "input_name": name,
                            "input_config": input_config,
                            "received_value": value,
                        },
                    }
                )
                continue
            if "max" in extra and value > extra["max"]:
                errors.append(
                    {
                        "type": "value_bigger_than_max",
                        "message": f"Value {value} bigger than max of {extra['max']}",
                        "details": f"{name}",
                        "extra_info": {
                            "input_name": name,
                            "input_config": input_config,
                            "received_value": value,
                        },
                    }
                )
                continue
            if isinstance(input_type, list) and value not in input_type:
                if self.accept_combo is not None and self.accept_combo(class_type, name, value):
                    continue
                if len(input_type) > 20:
                    list_info = f"(list of length {len(input_type)})"
                    combo_config: Any = None
                else:
                    list_info = str(input_type)
                    combo_config = input_config
                errors.append(
                    {
                        "type": "value_not_in_list",
                        "message": "Value not in list",
                        "details": f"{name}: '{value}' not in {list_info}",
                        "extra_info": {
                            "input_name": name,
                            "input_config": combo_config,
                            "received_value": value,
                        },
                    }
                )
                continue

        for name, check in self.custom.get(class_type, {}).items():
            if name not in inputs or isinstance(inputs[name], list):
                continue
            outcome = check(name, inputs)
            if outcome is not True:
                details = f"{name}" if outcome is False else f"{name} - {outcome}"
                errors.append(
                    {
                        "type": "custom_validation_failed",
                        "message": "Custom validation failed for node",
                        "details": details,
                        "extra_info": {"input_name": name},
                    }
                )

        if unique_id in self.validated:  # a cycle closed on this node while its inputs were checked
            errors = self.validated[unique_id][1] + errors
        result = (False, errors, unique_id) if errors or not valid else (True, [], unique_id)
        self.validated[unique_id] = result
        return result


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
    targets = (
        None if partial_execution_targets is None else {str(target) for target in partial_execution_targets}
    )
    outputs: list[str] = []
    for node_id, node in nodes.items():
        if "class_type" not in node:
            return ValidationResult(
                False,
                {
                    "type": "missing_node_type",
                    "message": f"Node '{_node_title(prompt, node_id)}' has no class_type. The workflow may be corrupted or a custom node may be missing.",
                    "details": f"Node ID '#{node_id}'",
                    "extra_info": {
                        "node_id": node_id,
                        "class_type": None,
                        "node_title": _node_title(prompt, node_id),
                    },
                },
                [],
                {},
            )
        class_type = node["class_type"]
        info = object_info.get(class_type) if isinstance(class_type, str) else None
        if not isinstance(info, Mapping):
            return ValidationResult(
                False,
                {
                    "type": "missing_node_type",
                    "message": f"Node '{class_type}' not found. The custom node may not be installed.",
                    "details": f"Node ID '#{node_id}'",
                    "extra_info": {
                        "node_id": node_id,
                        "class_type": class_type,
                        "node_title": _node_title(prompt, node_id),
                    },
                },
                [],
                {},
            )
        if info.get("output_node") is True and (targets is None or node_id in targets):
            outputs.append(node_id)

    if not outputs:
        return ValidationResult(
            False,
            {
                "type": "prompt_no_outputs",
                "message": "Prompt has no outputs",
                "details": "",
                "extra_info": {},
            },
            [],
            {},
        )

    validator = _Validator(prompt, object_info, custom_validators or {}, accept_combo)
    good_outputs: list[str] = []
    failed: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    for output_id in outputs:
        try:
            valid, reasons, _ = validator.validate_inputs(output_id)
        except Exception as exc:
            valid = False
            reasons = [
                {
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": str(exc),
                    "extra_info": {
                        "exception_type": _full_type_name(exc),
                        "traceback": traceback.format_tb(exc.__traceback__),
                    },
                }
            ]
            validator.validated[output_id] = (False, reasons, output_id)
        if valid:
            good_outputs.append(output_id)
            continue
        failed.append((output_id, reasons))
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

    if not good_outputs:
        details = "\n".join(
            f"{reason['message']}: {reason['details']}" for _, reasons in failed for reason in reasons
        )
        return ValidationResult(
            False,
            {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": details,
                "extra_info": {},
            },
            [],
            node_errors,
        )
    return ValidationResult(True, None, good_outputs, node_errors)
