"""Structural validation of an API-format ComfyUI graph, before anything is stored or sent.

An API-format graph is a JSON object of node id → ``{"class_type": str, "inputs": {...}}``. An input
whose value is a link ``[source_node_id, output_index]`` feeds that input from another node's output.
These checks need no knowledge of node types: shape, links that name existing nodes, no cycles, size.
What a node type accepts (ComfyUI semantics) is checked elsewhere, against a worker's catalogue.

Every problem is reported as a :class:`GraphError` naming the node and input at fault, so the API can
answer with all of them at once and the ComfyUI-format validator can reuse the same structure.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

# Stop collecting after this many problems: a broken 2,000-node graph must not produce a huge answer.
MAX_REPORTED_ERRORS: Final = 50
# Lists and objects inside a node nest at most this deep. Real workflows nest a few levels; a value nested
# hundreds of levels deep could be stored but not serialized back (JSON encoders stop near 255 levels).
MAX_VALUE_DEPTH: Final = 64


class GraphErrorType:
    """The ``type`` values of :class:`GraphError` (stable strings; clients may match on them)."""

    NOT_AN_OBJECT: Final = "graph_not_object"
    EMPTY: Final = "graph_empty"
    TOO_MANY_NODES: Final = "too_many_nodes"
    NODE_NOT_OBJECT: Final = "node_not_object"
    MISSING_CLASS_TYPE: Final = "missing_class_type"
    INVALID_CLASS_TYPE: Final = "invalid_class_type"
    MISSING_INPUTS: Final = "missing_inputs"
    INPUTS_NOT_OBJECT: Final = "inputs_not_object"
    INVALID_LINK: Final = "invalid_link"
    LINK_TO_MISSING_NODE: Final = "link_to_missing_node"
    CYCLE: Final = "cycle"
    TOO_DEEP: Final = "value_too_deep"


@dataclass(frozen=True, slots=True)
class GraphError:
    """One structural problem. ``node_id``/``input_name`` are None when the problem is the whole graph."""

    node_id: str | None
    input_name: str | None
    type: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "input_name": self.input_name,
            "type": self.type,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class Link:
    """A resolved link: ``node_id``'s input ``input_name`` reads output ``output_index`` of ``source_id``."""

    node_id: str
    input_name: str
    source_id: str
    output_index: int


def looks_like_link(value: object) -> bool:
    """Whether an input value is meant as a link: a two-item list starting with a node id string.

    ComfyUI treats such lists as links; a literal list value of a node is never ``[str, x]`` shaped
    in practice, so the second item is checked separately (see :func:`validate_graph`).
    """
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def _output_index(value: object) -> int | None:
    # bool is an int subclass, but ``["4", true]`` is a mistake, not output 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def iter_links(graph: Mapping[str, Any]) -> Iterator[Link]:
    """Every well-formed link of a graph that :func:`validate_graph` accepted, in document order."""
    for node_id, node in graph.items():
        inputs = node.get("inputs") if isinstance(node, Mapping) else None
        if not isinstance(inputs, Mapping):
            continue
        for input_name, value in inputs.items():
            if looks_like_link(value):
                index = _output_index(value[1])
                if index is not None:
                    yield Link(node_id, input_name, value[0], index)


def validate_graph(graph: object, *, max_nodes: int | None = None) -> list[GraphError]:
    """All structural problems of ``graph`` (empty when it is a valid API-format graph).

    Checks: a non-empty object of at most ``max_nodes`` nodes; each node an object with a non-empty
    string ``class_type`` and an object ``inputs``; each link ``[node_id, output_index]`` has a
    non-negative integer index and names an existing node; the links form no cycle.
    """
    if not isinstance(graph, Mapping):
        return [
            GraphError(
                None,
                None,
                GraphErrorType.NOT_AN_OBJECT,
                f"the graph must be an object of node id to node, not {_json_type(graph)}",
            )
        ]
    if not graph:
        return [GraphError(None, None, GraphErrorType.EMPTY, "the graph has no nodes")]
    if max_nodes is not None and len(graph) > max_nodes:
        return [
            GraphError(
                None,
                None,
                GraphErrorType.TOO_MANY_NODES,
                f"the graph has {len(graph)} nodes; the limit is {max_nodes}",
            )
        ]

    errors: list[GraphError] = []
    # One pass: check every node and collect its well-formed links for the cycle search.
    incoming: dict[str, list[_Edge]] = {}
    for raw_id, node in graph.items():
        node_id = str(raw_id)
        edges: list[_Edge] = []
        incoming[node_id] = edges
        _check_node(node_id, node, graph, errors, edges)
        if len(errors) >= MAX_REPORTED_ERRORS:
            return errors[:MAX_REPORTED_ERRORS]
    # A cycle through a broken link would be reported twice in different words; report the link only.
    if not errors:
        cycle = _find_cycle(incoming)
        if cycle is not None:
            errors.append(_cycle_error(cycle))
    return errors


# (consumer node id, input name, source node id, output index): a link before it is reported.
_Edge = tuple[str, str, str, int]


def _check_node(
    node_id: str, node: object, graph: Mapping[str, Any], errors: list[GraphError], edges: list[_Edge]
) -> None:
    if not isinstance(node, Mapping):
        errors.append(
            GraphError(
                node_id,
                None,
                GraphErrorType.NODE_NOT_OBJECT,
                f"node {node_id!r} must be an object with class_type and inputs, not {_json_type(node)}",
            )
        )
        return
    class_type = node.get("class_type")
    if class_type is None:
        errors.append(
            GraphError(
                node_id, None, GraphErrorType.MISSING_CLASS_TYPE, f"node {node_id!r} has no class_type"
            )
        )
    elif not isinstance(class_type, str) or not class_type.strip():
        errors.append(
            GraphError(
                node_id,
                None,
                GraphErrorType.INVALID_CLASS_TYPE,
                f"node {node_id!r}: class_type must be a non-empty string, not {_json_type(class_type)}",
            )
        )
    if "inputs" not in node:
        errors.append(
            GraphError(
                node_id,
                None,
                GraphErrorType.MISSING_INPUTS,
                f"node {node_id!r} has no inputs object (use {{}} for a node without inputs)",
            )
        )
        return
    inputs = node["inputs"]
    if not isinstance(inputs, Mapping):
        errors.append(
            GraphError(
                node_id,
                None,
                GraphErrorType.INPUTS_NOT_OBJECT,
                f"node {node_id!r}: inputs must be an object, not {_json_type(inputs)}",
            )
        )
        return
    for key, value in node.items():
        if key != "inputs" and isinstance(value, list | dict) and exceeds_depth(value, MAX_VALUE_DEPTH):
            errors.append(
                GraphError(
                    node_id,
                    None,
                    GraphErrorType.TOO_DEEP,
                    f"node {node_id!r}: {key!r} is nested deeper than {MAX_VALUE_DEPTH} levels",
                )
            )
    for input_name, value in inputs.items():
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)):
            if isinstance(value, list | dict) and exceeds_depth(value, MAX_VALUE_DEPTH):
                errors.append(
                    GraphError(
                        node_id,
                        input_name,
                        GraphErrorType.TOO_DEEP,
                        f"node {node_id!r} input {input_name!r} is nested deeper than {MAX_VALUE_DEPTH} levels",
                    )
                )
            continue
        source_id, raw_index = value
        index = _output_index(raw_index)
        if index is None:
            errors.append(
                GraphError(
                    node_id,
                    input_name,
                    GraphErrorType.INVALID_LINK,
                    f"node {node_id!r} input {input_name!r}: a link is [node_id, output_index] and the "
                    f"output index must be a non-negative integer, not {_short_repr(raw_index)}",
                )
            )
        elif source_id not in graph:
            errors.append(
                GraphError(
                    node_id,
                    input_name,
                    GraphErrorType.LINK_TO_MISSING_NODE,
                    f"node {node_id!r} input {input_name!r} links to node {source_id!r}, which is not in the graph",
                )
            )
        else:
            edges.append((node_id, input_name, source_id, index))


def exceeds_depth(value: object, limit: int) -> bool:
    """Whether lists and objects in ``value`` nest more than ``limit`` levels (``[[1]]`` is 2 levels).

    Iterative, so an absurdly deep value cannot exhaust the stack while it is being measured.
    """
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Iterable[object] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, Mapping | list | tuple))
    return False


def find_cycle(graph: Mapping[str, Any]) -> list[Link] | None:
    """The links of one cycle (in link order: each link's source is the previous link's node), or None."""
    incoming: dict[str, list[_Edge]] = {str(node_id): [] for node_id in graph}
    for link in iter_links(graph):
        if link.source_id in incoming:
            incoming[link.node_id].append((link.node_id, link.input_name, link.source_id, link.output_index))
    return _find_cycle(incoming)


def _find_cycle(incoming: Mapping[str, list[_Edge]]) -> list[Link] | None:
    # Iterative depth-first search, so a long chain cannot hit Python's recursion limit.
    unvisited, on_path, done = 0, 1, 2
    state = dict.fromkeys(incoming, unvisited)
    for start in incoming:
        if state[start] != unvisited:
            continue
        # Walk from a node to the nodes it reads from; a node met again while still on the path closes a cycle.
        path: list[tuple[str, Iterator[_Edge]]] = [(start, iter(incoming[start]))]
        via: list[_Edge] = []  # via[i] leads from path[i] to path[i + 1]
        state[start] = on_path
        while path:
            node_id, pending = path[-1]
            step = next(pending, None)
            if step is None:
                state[node_id] = done
                path.pop()
                if via:
                    via.pop()
                continue
            source = step[2]
            if state[source] == on_path:
                on_cycle = [entry[0] for entry in path]
                first = on_cycle.index(source)
                # Reverse so the cycle reads in data-flow order: source → consumer.
                return [Link(*edge) for edge in reversed([*via[first:], step])]
            if state[source] == unvisited:
                state[source] = on_path
                via.append(step)
                path.append((source, iter(incoming[source])))
    return None


def _cycle_error(cycle: list[Link]) -> GraphError:
    closing = cycle[-1]
    route = " → ".join([repr(cycle[0].source_id), *(repr(link.node_id) for link in cycle)])
    return GraphError(
        closing.node_id,
        closing.input_name,
        GraphErrorType.CYCLE,
        f"the graph has a cycle: {route} (node {closing.node_id!r} input {closing.input_name!r} closes it)",
    )


def _short_repr(value: object, limit: int = 40) -> str:
    if isinstance(value, list | dict | tuple):
        return _json_type(value)  # its repr could be huge, or nested too deep to print
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_type(value: object) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list() | tuple():
            return "an array"
        case Mapping():
            return "an object"
    return type(value).__name__
