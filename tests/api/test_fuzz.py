"""Whatever JSON arrives, the answer is a 201 or a 4xx in the error shape: never a 500."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx
from api_helpers import assert_error_shape
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import seed_body

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=25,
)
fields = st.sampled_from(
    [
        "payload",
        "workflow_id",
        "priority",
        "max_retries",
        "timeout_s",
        "pool",
        "inputs",
        "webhook",
        "metadata",
    ]
)


def mutated_seed(data: st.DataObject) -> Any:
    """The seed's body with a few fields or node inputs replaced by arbitrary JSON."""
    body: dict[str, Any] = seed_body()
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):
            body[data.draw(fields)] = data.draw(json_values)
        elif isinstance(body.get("payload"), dict) and body["payload"]:
            node_id = data.draw(st.sampled_from(sorted(body["payload"])))
            node = body["payload"][node_id]
            if isinstance(node, dict) and isinstance(node.get("inputs"), dict) and data.draw(st.booleans()):
                node["inputs"][data.draw(st.text(max_size=6))] = data.draw(json_values)
            else:
                body["payload"][node_id] = data.draw(json_values)
    return body


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_arbitrary_bodies_never_cause_a_500(client: httpx.AsyncClient, data: st.DataObject) -> None:
    body: Any = mutated_seed(data) if data.draw(st.booleans()) else data.draw(json_values)
    response = await client.post(
        "/api/v1/tasks", content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    if response.status_code == 201:
        assert response.json()["payload"] == body["payload"]
    else:
        assert_error_shape(response, response.status_code)
        assert 400 <= response.status_code < 500


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    params=st.dictionaries(
        st.sampled_from(["status", "workflow_id", "limit", "cursor"]), st.text(max_size=12)
    ),
    # Not ids that a URL resolves away: dot segments, nor a trailing slash (the router redirects "/x/" to "/x").
    task_id=st.text(min_size=1, max_size=40).filter(
        lambda text: text.strip(".") != "" and not text.endswith("/")
    ),
)
async def test_arbitrary_query_and_ids_never_cause_a_500(
    client: httpx.AsyncClient, params: dict[str, str], task_id: str
) -> None:
    listed = await client.get("/api/v1/tasks", params=params)
    assert listed.status_code in (200, 422), listed.text
    if listed.status_code == 422:
        assert_error_shape(listed, 422)
    for method in ("GET", "DELETE"):
        response = await client.request(method, f"/api/v1/tasks/{quote(task_id, safe='')}")
        assert_error_shape(response, 404)
