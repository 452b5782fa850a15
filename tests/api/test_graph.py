"""Structural validation of API-format graphs (``comfyfleet.domain.graph``)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comfyfleet.comfy import workflow
from comfyfleet.comfy.errors import MalformedPrompt
from comfyfleet.domain import graph as graph_module
from comfyfleet.domain.graph import (
    MAX_REPORTED_ERRORS,
    GraphError,
    GraphErrorType,
    Link,
    NotAGraph,
    find_cycle,
    inputs,
    is_link,
    iter_links,
    looks_like_link,
    nodes,
    validate_graph,
)
from support import seed_workflow


def node(class_type: str = "Node", **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def types_of(errors: list[GraphError]) -> list[str]:
    return [error.type for error in errors]


def test_the_seed_workflow_is_valid() -> None:
    assert validate_graph(seed_workflow()) == []
    links = list(iter_links(seed_workflow()))
    assert len(links) == 9
    assert {(link.node_id, link.input_name, link.source_id, link.output_index) for link in links} >= {
        ("3", "model", "4", 0),
        ("6", "clip", "4", 1),
        ("8", "vae", "4", 2),
        ("9", "images", "8", 0),
    }


def test_not_an_object() -> None:
    graph: object
    for graph in ([], "graph", 3, None):
        errors = validate_graph(graph)
        assert types_of(errors) == [GraphErrorType.NOT_AN_OBJECT]
        assert errors[0].node_id is None


def test_empty_graph() -> None:
    assert types_of(validate_graph({})) == [GraphErrorType.EMPTY]


def test_node_limit() -> None:
    graph = {str(index): node() for index in range(11)}
    assert validate_graph(graph, max_nodes=11) == []
    errors = validate_graph(graph, max_nodes=10)
    assert types_of(errors) == [GraphErrorType.TOO_MANY_NODES]
    assert "11 nodes" in errors[0].message
    assert "10" in errors[0].message


def test_node_shape_errors_name_the_node() -> None:
    graph = {
        "1": "not a node",
        "2": {"inputs": {}},
        "3": {"class_type": 7, "inputs": {}},
        "4": {"class_type": "X"},
        "5": {"class_type": "X", "inputs": []},
        "6": {"class_type": "  ", "inputs": {}},
    }
    errors = validate_graph(graph)
    assert [(error.node_id, error.type) for error in errors] == [
        ("1", GraphErrorType.NODE_NOT_OBJECT),
        ("2", GraphErrorType.MISSING_CLASS_TYPE),
        ("3", GraphErrorType.INVALID_CLASS_TYPE),
        ("4", GraphErrorType.MISSING_INPUTS),
        ("5", GraphErrorType.INPUTS_NOT_OBJECT),
        ("6", GraphErrorType.INVALID_CLASS_TYPE),
    ]
    assert all(f"'{error.node_id}'" in error.message for error in errors)


def test_link_to_a_missing_node_names_node_and_input() -> None:
    graph = {"1": node(), "2": node(image=["1", 0], mask=["99", 0])}
    errors = validate_graph(graph)
    assert errors == [GraphError("2", "mask", GraphErrorType.LINK_TO_MISSING_NODE, errors[0].message)]
    assert "'99'" in errors[0].message
    assert "'mask'" in errors[0].message


def test_bad_output_index() -> None:
    graph = {"1": node(), "2": node(a=["1", -1], b=["1", 1.5], c=["1", True], d=["1", "0"])}
    errors = validate_graph(graph)
    assert [(error.input_name, error.type) for error in errors] == [
        ("a", GraphErrorType.INVALID_LINK),
        ("b", GraphErrorType.INVALID_LINK),
        ("c", GraphErrorType.INVALID_LINK),
        ("d", GraphErrorType.INVALID_LINK),
    ]


def test_literal_lists_are_not_links() -> None:
    graph = {"1": node(sizes=[512, 768], words=["a", "b", "c"], pair=[1, "x"], empty=[])}
    assert validate_graph(graph) == []
    assert list(iter_links(graph)) == []


def test_self_loop_is_a_cycle() -> None:
    errors = validate_graph({"1": node(x=["1", 0])})
    assert types_of(errors) == [GraphErrorType.CYCLE]
    assert (errors[0].node_id, errors[0].input_name) == ("1", "x")


def test_cycle_names_the_closing_input_and_the_route() -> None:
    graph = {"a": node(x=["c", 0]), "b": node(x=["a", 0]), "c": node(x=["b", 0]), "d": node(x=["c", 0])}
    errors = validate_graph(graph)
    assert types_of(errors) == [GraphErrorType.CYCLE]
    error = errors[0]
    assert error.node_id in {"a", "b", "c"}
    assert error.input_name == "x"
    for name in ("'a'", "'b'", "'c'"):
        assert name in error.message
    assert "'d'" not in error.message


def test_errors_are_capped() -> None:
    graph: dict[str, Any] = {str(index): {"inputs": {}} for index in range(200)}
    assert len(validate_graph(graph)) == MAX_REPORTED_ERRORS


def test_a_long_chain_does_not_hit_the_recursion_limit() -> None:
    length = 5000
    graph = {str(index): node(x=[str(index - 1), 0]) if index else node() for index in range(length)}
    assert validate_graph(graph) == []
    graph["0"] = node(x=[str(length - 1), 0])
    assert types_of(validate_graph(graph)) == [GraphErrorType.CYCLE]


def test_as_dict() -> None:
    error = GraphError("3", "model", GraphErrorType.LINK_TO_MISSING_NODE, "m")
    assert error.as_dict() == {
        "node_id": "3",
        "input_name": "model",
        "type": "link_to_missing_node",
        "message": "m",
    }


# -- properties ---------------------------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> dict[str, Any]:
    """Random valid graphs: node i may only read from nodes before it, so there is never a cycle."""
    size = draw(st.integers(min_value=1, max_value=25))
    ids = draw(st.lists(st.text(min_size=1, max_size=4), min_size=size, max_size=size, unique=True))
    graph: dict[str, Any] = {}
    for index, node_id in enumerate(ids):
        inputs: dict[str, Any] = {}
        for input_index in range(draw(st.integers(min_value=0, max_value=4))):
            if index and draw(st.booleans()):
                inputs[f"in{input_index}"] = [ids[draw(st.integers(0, index - 1))], draw(st.integers(0, 5))]
            else:
                inputs[f"in{input_index}"] = draw(st.one_of(st.integers(), st.text(max_size=5), st.none()))
        graph[node_id] = {"class_type": "Node", "inputs": inputs}
    return graph


@settings(max_examples=60, deadline=None)
@given(dags())
def test_acyclic_graphs_are_valid(graph: dict[str, Any]) -> None:
    assert validate_graph(graph) == []
    assert find_cycle(graph) is None


@settings(max_examples=60, deadline=None)
@given(dags(), st.data())
def test_a_back_link_makes_a_cycle_that_is_reported(graph: dict[str, Any], data: st.DataObject) -> None:
    ids = list(graph)
    # Make some node read from a node that (transitively) reads from it, or from itself.
    links = list(iter_links(graph))
    if links:
        link = data.draw(st.sampled_from(links))
        consumer, source = link.source_id, link.node_id  # reverse an existing edge
    else:
        consumer = source = data.draw(st.sampled_from(ids))
    graph[consumer]["inputs"]["back"] = [source, 0]
    cycle = find_cycle(graph)
    assert cycle is not None
    # The cycle is a closed walk of real links: each link's source is the previous link's consumer.
    for previous, current in zip([cycle[-1], *cycle], cycle, strict=False):
        assert current.source_id == previous.node_id
        assert graph[current.node_id]["inputs"][current.input_name] == [
            current.source_id,
            current.output_index,
        ]
    errors = validate_graph(graph)
    assert types_of(errors) == [GraphErrorType.CYCLE]


@settings(max_examples=60, deadline=None)
@given(dags(), st.data())
def test_a_dangling_link_is_reported_at_its_input(graph: dict[str, Any], data: st.DataObject) -> None:
    target = data.draw(st.sampled_from(list(graph)))
    missing = "missing-" + "".join(graph)  # cannot be one of the ids
    graph[target]["inputs"]["dangling"] = [missing, 0]
    errors = validate_graph(graph)
    assert [(error.node_id, error.input_name, error.type) for error in errors] == [
        (target, "dangling", GraphErrorType.LINK_TO_MISSING_NODE)
    ]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=60, deadline=None)
@given(dags())
def test_one_walk_of_nodes_inputs_and_links(graph: dict[str, Any]) -> None:
    """The walkers visit every input once, in document order, and a link is exactly an input that is one."""
    walked = list(inputs(graph))
    assert [(i.node_id, i.name, i.value) for i in walked] == [
        (node_id, name, value) for node_id, node in graph.items() for name, value in node["inputs"].items()
    ]
    assert list(iter_links(graph)) == [
        Link(i.node_id, i.name, i.value[0], i.value[1]) for i in walked if is_link(i.value)
    ]
    assert [node_id for node_id, _ in nodes(graph)] == list(graph)


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(dags() | _json_values | st.dictionaries(st.text(max_size=3), _json_values, max_size=4))
def test_what_the_door_accepts_the_comfyui_side_can_walk(graph: Any) -> None:
    """Validation at the door and ComfyUI-side inspection read the same model: a graph the door accepts can
    always be inspected, and one that cannot be walked is refused at the door for its shape."""
    errors = validate_graph(graph, max_nodes=100)
    try:
        list(nodes(graph))
    except NotAGraph:
        assert {error.type for error in errors} & {
            GraphErrorType.NOT_AN_OBJECT,
            GraphErrorType.NODE_NOT_OBJECT,
        }
        with pytest.raises(MalformedPrompt):
            workflow.node_types(graph)
        return
    if not errors:
        workflow.node_types(graph)
        workflow.model_references(graph)
        workflow.input_files(graph)
        assert workflow.output_nodes(graph, {}) == []


@settings(max_examples=200, deadline=None)
@given(st.one_of(_json_values, st.tuples(st.just("1"), _json_values).map(list)))
def test_one_link_test_at_the_door_and_in_the_walk(value: Any) -> None:
    """A value meant as a link is refused at the door exactly when it is not a well-formed link, and the
    walk yields a link exactly for the well-formed ones."""
    graph = {"1": node(), "2": node(x=value)}
    errors = validate_graph(graph)
    if looks_like_link(value) and value[0] == "1":
        assert (errors == []) is is_link(value)
        assert types_of(errors) in ([], [GraphErrorType.INVALID_LINK])
    assert (list(iter_links(graph)) != []) is is_link(value)


@settings(max_examples=100, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
        ),
        max_leaves=30,
    )
)
def test_any_json_value_gets_an_answer_never_an_exception(value: Any) -> None:
    errors = validate_graph(value, max_nodes=100)
    assert isinstance(errors, list)
    assert all(isinstance(error, GraphError) and error.message for error in errors)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


_NODE_IDS = st.sampled_from(["1", "2", "3", "4"])
_GRAPH_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2, 3), st.floats(allow_nan=False), st.text(max_size=2)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=2), inner, max_size=3),
        st.tuples(_NODE_IDS, st.one_of(st.integers(-1, 2), st.booleans(), st.floats())).map(list),
    ),
    max_leaves=6,
)
_LINKS = st.tuples(_NODE_IDS, st.one_of(st.integers(0, 2), st.integers(-1, 0), st.booleans())).map(list)
# Well-shaped nodes whose links may dangle or close a cycle, and nodes of any shape.
_WELL_SHAPED_NODES = st.fixed_dictionaries(
    {
        "class_type": st.sampled_from(["A", "B"]),
        "inputs": st.dictionaries(st.text(max_size=2), st.one_of(_LINKS, _LINKS, _GRAPH_VALUES), max_size=3),
    },
    optional={"_meta": st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=1)},
)
_ANY_NODES = st.one_of(
    st.fixed_dictionaries(
        {
            "class_type": st.one_of(st.sampled_from(["A", " ", ""]), st.none(), st.integers()),
            "inputs": st.one_of(
                st.dictionaries(st.text(max_size=2), _GRAPH_VALUES, max_size=4), _GRAPH_VALUES
            ),
        },
        optional={"_meta": _GRAPH_VALUES},
    ),
    _GRAPH_VALUES,
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.dictionaries(_NODE_IDS, _WELL_SHAPED_NODES, min_size=1, max_size=4),
        st.dictionaries(_NODE_IDS, st.one_of(_WELL_SHAPED_NODES, _ANY_NODES), min_size=1, max_size=4),
    )
)
def test_the_quick_check_of_a_plainly_valid_graph_hides_no_problem(graph: dict[str, Any]) -> None:
    """A graph the quick path passes is one the full check finds nothing wrong with, cycles included (and a
    graph with a problem is always worded by the full check)."""
    full = graph_module._node_and_cycle_problems(graph)
    if graph_module._plainly_valid(graph):
        assert full == []
    assert validate_graph(graph) == full


def test_values_nested_too_deep_are_refused_where_they_are() -> None:
    from comfyfleet.domain.graph import MAX_VALUE_DEPTH, exceeds_depth

    assert not exceeds_depth(nested(MAX_VALUE_DEPTH), MAX_VALUE_DEPTH)
    assert exceeds_depth(nested(MAX_VALUE_DEPTH + 1), MAX_VALUE_DEPTH)
    assert not exceeds_depth({"a": [{"b": 1}]}, 3)
    assert exceeds_depth({"a": [{"b": []}]}, 3)
    assert validate_graph({"1": node(ok=nested(MAX_VALUE_DEPTH))}) == []
    graph = {
        "1": {**node(deep=nested(5000)), "_meta": nested(MAX_VALUE_DEPTH + 1)},
        "2": node(x=["1", nested(300)]),
    }
    errors = validate_graph(graph)
    assert [(error.node_id, error.input_name, error.type) for error in errors] == [
        ("1", None, GraphErrorType.TOO_DEEP),
        ("1", "deep", GraphErrorType.TOO_DEEP),
        ("2", "x", GraphErrorType.INVALID_LINK),
    ]
    assert all(len(error.message) < 200 for error in errors)
