"""The node-by-node checks behind :func:`comfyfleet.comfy.workflow.validate`: upstream's ``validate_inputs``.

Each check answers with ComfyUI's own error dict (``type``, ``message``, ``details``, ``extra_info``), in
upstream's order: missing required inputs, linked inputs (shape, return type, then the source node itself),
scalar coercion, range, combo lists, and the node's own VALIDATE_INPUTS.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from typing import Any

Graph = Mapping[str, Any]
ObjectInfo = Mapping[str, Any]
Reason = dict[str, Any]
Reasons = list[Reason]
# (valid, reasons, node id): upstream's validate_inputs result.
Verdict = tuple[bool, Reasons, str]

# (input_name, inputs of the node) -> True when fine, else False or an error text. Plays VALIDATE_INPUTS.
CustomValidator = Callable[[str, Mapping[str, Any]], "bool | str"]
# (class_type, input_name, value) -> True to accept a combo value that is not in the list.
ComboAcceptor = Callable[[str, str, Any], bool]

_COERCE: dict[str, Callable[[Any], Any]] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


def full_type_name(exc: BaseException) -> str:
    module = type(exc).__module__
    return type(exc).__qualname__ if module in ("builtins", None) else f"{module}.{type(exc).__qualname__}"


def _reason(kind: str, message: str, details: str, **extra_info: Any) -> Reason:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


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


def _declared_inputs(info: Mapping[str, Any]) -> list[str]:
    declared = info.get("input", {})
    required = declared.get("required", {})
    return list(required) + [name for name in declared.get("optional", {}) if name not in required]


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


class NodeValidator:
    """Validates the nodes an output depends on, each once, remembering every verdict in ``validated``."""

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
        self.validated: dict[str, Verdict] = {}
        self.stack: list[str] = []

    def validate_output(self, output_id: str) -> tuple[bool, Reasons]:
        """An output node and everything it reads; an exception is upstream's ``exception_during_validation``
        (a link to a missing node is a KeyError there, an output index out of range an IndexError)."""
        try:
            valid, reasons, _ = self.validate_inputs(output_id)
        except Exception as exc:
            reasons = [
                _reason(
                    "exception_during_validation",
                    "Exception when validating node",
                    str(exc),
                    exception_type=full_type_name(exc),
                    traceback=traceback.format_tb(exc.__traceback__),
                )
            ]
            self.validated[output_id] = (False, reasons, output_id)
            return False, reasons
        return valid, reasons

    def validate_inputs(self, unique_id: str) -> Verdict:
        if unique_id in self.validated:
            return self.validated[unique_id]
        if unique_id in self.stack:
            cycle = [*self.stack[self.stack.index(unique_id) :], unique_id]
            details = " -> ".join(f"{node} ({self.prompt[node]['class_type']})" for node in cycle)
            reason = _reason(
                "dependency_cycle",
                "Dependency cycle detected",
                details,
                node_id=unique_id,
                cycle_nodes=cycle[:-1],
            )
            self.validated[unique_id] = (False, [reason], unique_id)
            return self.validated[unique_id]
        self.stack.append(unique_id)
        try:
            return self._validate_node(unique_id)
        finally:
            self.stack.pop()

    def _validate_node(self, unique_id: str) -> Verdict:
        node = self.prompt[unique_id]
        inputs, class_type = node["inputs"], node["class_type"]
        info = self.object_info[class_type]
        errors: Reasons = []
        valid = True
        for name in _declared_inputs(info):
            input_type, category, extra = _input_spec(info, name)
            if name not in inputs:
                if category == "required":
                    errors.append(
                        _reason(
                            "required_input_missing", "Required input is missing", f"{name}", input_name=name
                        )
                    )
                continue
            if isinstance(inputs[name], list):
                error, linked_valid = self._check_linked(name, inputs[name], input_type, [input_type, extra])
                valid = valid and linked_valid
            else:
                error = self._check_value(class_type, inputs, name, input_type, extra)
            if error is not None:
                errors.append(error)
        errors.extend(self._custom_checks(class_type, inputs))
        if unique_id in self.validated:  # a cycle closed on this node while its inputs were checked
            errors = self.validated[unique_id][1] + errors
        verdict = (False, errors, unique_id) if errors or not valid else (True, [], unique_id)
        self.validated[unique_id] = verdict
        return verdict

    def _check_linked(
        self, name: str, value: list[Any], input_type: Any, input_config: list[Any]
    ) -> tuple[Reason | None, bool]:
        """A linked input: its own problem, and whether the node it reads from is valid."""
        if len(value) != 2:
            return _reason(
                "bad_linked_input",
                "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                f"{name}",
                input_name=name,
                input_config=input_config,
                received_value=value,
            ), True
        source_id = value[0]
        # A missing source node or output index raises, exactly like upstream: the exception becomes
        # ``exception_during_validation`` on the output being validated.
        source_class = self.prompt[source_id]["class_type"]
        received_type = tuple(self.object_info[source_class]["output"])[value[1]]
        if not _types_match(received_type, input_type):
            return _reason(
                "return_type_mismatch",
                "Return type mismatch between linked nodes",
                f"{name}, received_type({received_type}) mismatch input_type({input_type})",
                input_name=name,
                input_config=input_config,
                received_type=received_type,
                linked_node=value,
            ), True
        try:
            return None, self.validate_inputs(source_id)[0] is not False
        except Exception as exc:
            self.validated[source_id] = (
                False,
                [
                    _reason(
                        "exception_during_inner_validation",
                        "Exception when validating inner node",
                        str(exc),
                        input_name=name,
                        input_config=input_config,
                        exception_message=str(exc),
                        exception_type=full_type_name(exc),
                        traceback=traceback.format_tb(exc.__traceback__),
                        linked_node=value,
                    )
                ],
                source_id,
            )
            return None, False

    def _check_value(
        self, class_type: str, inputs: Any, name: str, input_type: Any, extra: dict[str, Any]
    ) -> Reason | None:
        """A literal input: coerced in place like upstream, then checked against range and combo list."""
        value = inputs[name]
        input_config = [input_type, extra]
        try:
            if isinstance(value, Mapping) and "__value__" in value:
                value = inputs[name] = value["__value__"]
            if isinstance(input_type, str) and input_type in _COERCE:
                value = inputs[name] = _COERCE[input_type](value)
        except Exception as exc:
            return _reason(
                "invalid_input_type",
                f"Failed to convert an input value to a {input_type} value",
                f"{name}, {value}, {exc}",
                input_name=name,
                input_config=input_config,
                received_value=value,
                exception_message=str(exc),
            )
        if name in self.custom.get(class_type, {}):
            return None  # a node with its own VALIDATE_INPUTS for this input skips the generic checks
        if "min" in extra and value < extra["min"]:
            return _reason(
                "value_smaller_than_min",
                f"Value {value} smaller than min of {extra['min']}",
                f"{name}",
                input_name=name,
                input_config=input_config,
                received_value=value,
            )
        if "max" in extra and value > extra["max"]:
            return _reason(
                "value_bigger_than_max",
                f"Value {value} bigger than max of {extra['max']}",
                f"{name}",
                input_name=name,
                input_config=input_config,
                received_value=value,
            )
        return self._check_combo(class_type, name, value, input_type, input_config)

    def _check_combo(
        self, class_type: str, name: str, value: Any, input_type: Any, input_config: list[Any]
    ) -> Reason | None:
        if not isinstance(input_type, list) or value in input_type:
            return None
        if self.accept_combo is not None and self.accept_combo(class_type, name, value):
            return None
        # Upstream elides long lists, and then leaves the input's config out too.
        list_info = f"(list of length {len(input_type)})" if len(input_type) > 20 else str(input_type)
        return _reason(
            "value_not_in_list",
            "Value not in list",
            f"{name}: '{value}' not in {list_info}",
            input_name=name,
            input_config=None if len(input_type) > 20 else input_config,
            received_value=value,
        )

    def _custom_checks(self, class_type: str, inputs: Mapping[str, Any]) -> Reasons:
        errors: Reasons = []
        for name, check in self.custom.get(class_type, {}).items():
            if name not in inputs or isinstance(inputs[name], list):
                continue
            outcome = check(name, inputs)
            if outcome is not True:
                details = f"{name}" if outcome is False else f"{name} - {outcome}"
                errors.append(
                    _reason(
                        "custom_validation_failed",
                        "Custom validation failed for node",
                        details,
                        input_name=name,
                    )
                )
        return errors
