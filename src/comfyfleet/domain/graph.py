"""The graph model of an API-format ComfyUI graph, and its structural validation at the door.

An API-format graph is a JSON object of node id → ``{"class_type": str, "inputs": {...}}``. An input
whose value is a link ``[source_node_id, output_index]`` feeds that input from another node's output.

This module is the one place that knows how to walk a graph: :func:`nodes` and :func:`inputs` visit
nodes and inputs, :func:`looks_like_link` / :func:`is_link` say what a link is, :class:`Link` is one. The
structural checks here (:func:`validate_graph`) need no knowledge of node types: shape, links that name
existing nodes, no cycles, size, nesting. What a node type accepts (ComfyUI semantics) is checked in
``comfy/workflow.py`` against a worker's ``object_info``, over this same model.

Every structural problem is reported as a :class:`GraphError` naming the node and input at fault, so the
API can answer with all of them at once.
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


@dataclass(frozen=True, slots=True)
class Input:
    """One input of one node, as written in the graph (a literal value or a link)."""

    node_id: str
    class_type: str
    name: str
    value: Any

    def link(self) -> Link | None:
        """The link this input reads, when its value is a well-formed one."""
        if not is_link(self.value):
            return None
        return Link(self.node_id, self.name, self.value[0], self.value[1])


class NotAGraph(ValueError):
    """The graph, or one of its nodes, is not a JSON object: there is nothing to walk."""


def looks_like_link(value: object) -> bool:
    """Whether an input value is meant as a link: a two-item list starting with a node id string.

    ComfyUI treats such lists as links; a literal list value of a node is never ``[str, x]`` shaped
    in practice. Whether the second item is a usable output index is :func:`output_index`'s question.
    """
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def output_index(value: object) -> int | None:
    """``value`` as an output index: a non-negative integer, else None."""
    # bool is an int subclass, but ``["4", true]`` is a mistake, not output 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def is_link(value: object) -> bool:
    """Whether ``value`` is a well-formed link: ``[source node id, non-negative output index]``."""
    return looks_like_link(value) and output_index(value[1]) is not None  # type: ignore[index]


UI_FORMAT_HELP: Final = (
    "comfyfleet runs workflows in ComfyUI's API format. Export that format from ComfyUI: in the new "
    'interface, use the menu Workflow → Export (API); in the old interface, turn on "Enable Dev mode '
    'Options" in the settings (gear icon) and use "Save (API Format)". Then submit the exported file.'
)
"""How to get the API format from ComfyUI, for everyone who meets a UI-format workflow (server and CLI)."""


def is_ui_format(value: object) -> bool:
    """Whether ``value`` is a workflow saved in ComfyUI's UI format (top-level ``nodes`` and ``links``
    lists, what "Save" writes) rather than the API format comfyfleet runs."""
    return (
        isinstance(value, Mapping)
        and isinstance(value.get("nodes"), list)
        and isinstance(value.get("links"), list)
    )


def looks_like_api_graph(value: object) -> bool:
    """Whether ``value`` looks like an API-format graph: a non-empty object whose entries are all nodes with
    a ``class_type`` (to tell a graph sent where a wrapper was expected)."""
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(node, Mapping) and "class_type" in node for node in value.values())
    )


def _entries(graph: Mapping[Any, Any]) -> Iterator[tuple[str, object]]:
    # Node ids are strings on the wire; a Python caller's other keys are read as their str.
    for node_id, node in graph.items():
        yield str(node_id), node


def _class_type(node: Mapping[str, Any]) -> str:
    class_type = node.get("class_type")
    return class_type if isinstance(class_type, str) else ""


def _node_inputs(node_id: str, node: Mapping[str, Any]) -> Iterator[Input]:
    inputs = node.get("inputs")
    if isinstance(inputs, Mapping):
        class_type = _class_type(node)
        for name, value in inputs.items():
            yield Input(node_id, class_type, str(name), value)


def nodes(graph: object) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every node of ``graph`` with its id, in document order. Raises :class:`NotAGraph` when the graph or
    a node is not a JSON object (check :func:`validate_graph` first to report every problem instead)."""
    if not isinstance(graph, Mapping):
        raise NotAGraph(f"the graph must be an object of node id to node, not {_json_type(graph)}")
    for node_id, node in _entries(graph):
        if not isinstance(node, Mapping):
            raise NotAGraph(
                f"node {node_id!r} must be an object with class_type and inputs, not {_json_type(node)}"
            )
        yield node_id, node


def inputs(graph: object) -> Iterator[Input]:
    """Every input of every node, in document order; a node without an ``inputs`` object has none."""
    for node_id, node in nodes(graph):
        yield from _node_inputs(node_id, node)


def iter_links(graph: object) -> Iterator[Link]:
    """Every well-formed link of ``graph``, in document order."""
    for item in inputs(graph):
        link = item.link()
        if link is not None:
            yield link


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
    return [] if _plainly_valid(graph) else _node_and_cycle_problems(graph)


def _node_and_cycle_problems(graph: Mapping[Any, Any]) -> list[GraphError]:
    """Every problem of the nodes of ``graph`` (at most :data:`MAX_REPORTED_ERRORS`), else its cycle if any."""
    errors: list[GraphError] = []
    # One pass: check every node and collect its well-formed links for the cycle search.
    incoming: dict[str, list[Link]] = {}
    for node_id, node in _entries(graph):
        edges: list[Link] = []
        incoming[node_id] = edges
        errors.extend(_check_node(node_id, node, graph, edges))
        if len(errors) >= MAX_REPORTED_ERRORS:
            return errors[:MAX_REPORTED_ERRORS]
    # A cycle through a broken link would be reported twice in different words; report the link only.
    if not errors:
        cycle = _find_cycle(incoming)
        if cycle is not None:
            errors.append(_cycle_error(cycle))
    return errors


_SCALARS: Final = (str, int, float, bool, type(None))


def _plainly_valid(graph: Mapping[Any, Any]) -> bool:
    """True when ``graph`` certainly has no problem: the common case, checked without building the objects
    problems are reported with. False means "not sure": the full check decides (and words the problems)."""
    if type(graph) is not dict:
        return False
    sources: dict[str, list[str]] = {}
    for node_id, node in graph.items():
        node_sources = _plain_node_sources(node, graph) if type(node_id) is str else None
        if node_sources is None:
            return False
        sources[node_id] = node_sources
    return not _has_cycle(sources)


def _plain_node_sources(node: object, graph: dict[Any, Any]) -> list[str] | None:
    """The ids of the nodes a plainly valid ``node`` reads from, or None when it may have a problem."""
    if type(node) is not dict:
        return None
    class_type = node.get("class_type")
    node_inputs = node.get("inputs")
    if type(class_type) is not str or not class_type.strip() or type(node_inputs) is not dict:
        return None
    for key, value in node.items():
        if key != "inputs" and not _plain_value(value):
            return None
    sources = []
    for value in node_inputs.values():
        if type(value) is list and len(value) == 2 and isinstance(value[0], str):
            source, index = value
            if type(source) is not str or type(index) is not int or index < 0 or source not in graph:
                return None
            sources.append(source)
        elif not _plain_value(value):
            return None
    return sources


def _has_cycle(sources: dict[str, list[str]]) -> bool:
    """Whether following ``sources`` (node → the nodes it reads from) from some node leads back to it."""
    unvisited, on_path, done = 0, 1, 2
    state = dict.fromkeys(sources, unvisited)
    for start in sources:
        if state[start] != unvisited:
            continue
        state[start] = on_path
        path = [(start, iter(sources[start]))]
        while path:
            node_id, pending = path[-1]
            for source in pending:
                if state[source] == on_path:
                    return True
                if state[source] == unvisited:
                    state[source] = on_path
                    path.append((source, iter(sources[source])))
                    break
            else:
                state[node_id] = done
                path.pop()
    return False


def _plain_value(value: object) -> bool:
    """A JSON scalar, or a JSON list or object nested no deeper than allowed."""
    kind = type(value)
    if kind is list or kind is dict:
        return not exceeds_depth(value, MAX_VALUE_DEPTH)
    return kind in _SCALARS


def _check_node(
    node_id: str, node: object, graph: Mapping[str, Any], edges: list[Link]
) -> Iterator[GraphError]:
    """The problems of one node; its well-formed links to existing nodes are appended to ``edges``."""
    if not isinstance(node, Mapping):
        yield GraphError(
            node_id,
            None,
            GraphErrorType.NODE_NOT_OBJECT,
            f"node {node_id!r} must be an object with class_type and inputs, not {_json_type(node)}",
        )
        return
    yield from _check_class_type(node_id, node)
    if "inputs" not in node:
        message = f"node {node_id!r} has no inputs object (use {{}} for a node without inputs)"
        yield GraphError(node_id, None, GraphErrorType.MISSING_INPUTS, message)
        return
    if not isinstance(node["inputs"], Mapping):
        message = f"node {node_id!r}: inputs must be an object, not {_json_type(node['inputs'])}"
        yield GraphError(node_id, None, GraphErrorType.INPUTS_NOT_OBJECT, message)
        return
    for key, value in node.items():
        if key != "inputs" and isinstance(value, list | dict) and exceeds_depth(value, MAX_VALUE_DEPTH):
            message = f"node {node_id!r}: {key!r} is nested deeper than {MAX_VALUE_DEPTH} levels"
            yield GraphError(node_id, None, GraphErrorType.TOO_DEEP, message)
    for item in _node_inputs(node_id, node):
        problem = _check_input(item, graph)
        if isinstance(problem, Link):
            edges.append(problem)
        elif problem is not None:
            yield problem


def _check_class_type(node_id: str, node: Mapping[str, Any]) -> Iterator[GraphError]:
    class_type = node.get("class_type")
    if class_type is None:
        yield GraphError(
            node_id, None, GraphErrorType.MISSING_CLASS_TYPE, f"node {node_id!r} has no class_type"
        )
    elif not isinstance(class_type, str) or not class_type.strip():
        message = f"node {node_id!r}: class_type must be a non-empty string, not {_json_type(class_type)}"
        yield GraphError(node_id, None, GraphErrorType.INVALID_CLASS_TYPE, message)


def _check_input(item: Input, graph: Mapping[str, Any]) -> GraphError | Link | None:
    """A link to an existing node, the problem of this input, or None for a fine literal value."""
    where = f"node {item.node_id!r} input {item.name!r}"
    if not looks_like_link(item.value):
        if isinstance(item.value, list | dict) and exceeds_depth(item.value, MAX_VALUE_DEPTH):
            message = f"{where} is nested deeper than {MAX_VALUE_DEPTH} levels"
            return GraphError(item.node_id, item.name, GraphErrorType.TOO_DEEP, message)
        return None
    link = item.link()
    if link is None:
        return GraphError(
            item.node_id,
            item.name,
            GraphErrorType.INVALID_LINK,
            f"{where}: a link is [node_id, output_index] and the output index must be a non-negative "
            f"integer, not {_short_repr(item.value[1])}",
        )
    if link.source_id not in graph:
        return GraphError(
            item.node_id,
            item.name,
            GraphErrorType.LINK_TO_MISSING_NODE,
            f"{where} links to node {link.source_id!r}, which is not in the graph",
        )
    return link


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
    incoming: dict[str, list[Link]] = {node_id: [] for node_id, _ in _entries(graph)}
    for link in iter_links(graph):
        if link.source_id in incoming:
            incoming[link.node_id].append(link)
    return _find_cycle(incoming)


def _find_cycle(incoming: Mapping[str, list[Link]]) -> list[Link] | None:
    # Iterative depth-first search, so a long chain cannot hit Python's recursion limit.
    unvisited, on_path, done = 0, 1, 2
    state = dict.fromkeys(incoming, unvisited)
    for start in incoming:
        if state[start] != unvisited:
            continue
        # Walk from a node to the nodes it reads from; a node met again while still on the path closes a cycle.
        path: list[tuple[str, Iterator[Link]]] = [(start, iter(incoming[start]))]
        via: list[Link] = []  # via[i] leads from path[i] to path[i + 1]
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
            source = step.source_id
            if state[source] == on_path:
                first = [entry[0] for entry in path].index(source)
                # Reverse so the cycle reads in data-flow order: source → consumer.
                return list(reversed([*via[first:], step]))
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
