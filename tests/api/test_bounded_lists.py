"""Lists answer in bounded size and memory, on SQLite and PostgreSQL (the shared ``store`` fixture runs each test
on both): ``GET /api/v1/tasks`` leaves payloads out unless ``?include=payload`` and then cuts a page at the
byte budget (``limits.max_page_bytes``), with a ``next_cursor`` to go on; the gateway's ``/history`` and
``/queue`` keep to the same budget. The server's peak allocation while answering is measured with
``tracemalloc``: a list of many large tasks must not read their payloads at all."""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest
from api_helpers import assert_error_shape

from comfyfleet.config import Limits, Settings
from comfyfleet.domain import NewTask
from comfyfleet.runtime import create_app
from comfyfleet.store import Lease, Store

TASKS = 12
PAYLOAD_BYTES = 1_000_000
BUDGET = 2_500_000  # two of these tasks fit in a page, a third does not
MIB = 1024 * 1024
T = TypeVar("T")


def large_payload(index: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "CLIPTextEncode", "inputs": {"text": f"{index:04d}" + "x" * PAYLOAD_BYTES}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
    }


@pytest.fixture
async def http(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(store=store.url, limits=Limits(max_page_bytes=BUDGET))
    app = create_app(settings, store)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://comfyfleet.test"
    ) as client:
        yield client


@pytest.fixture
async def large_tasks(store: Store) -> list[str]:
    """Ids of TASKS tasks of about 1 MB each, oldest first: every other one completed, the rest pending."""
    ids = []
    for index in range(TASKS):
        task, _ = await store.create_task(NewTask(payload=large_payload(index), workflow_id="big"))
        ids.append(task.id)
    for task_id in ids[::2]:
        [claimed] = await store.claim_ids("test", 60.0, [task_id])
        assert claimed.lease_owner is not None
        await store.complete_task(Lease(claimed.id, claimed.attempt, claimed.lease_owner), {"outputs": []})
    return ids


async def peak_bytes(call: Callable[[], Awaitable[T]]) -> tuple[T, int]:
    """What ``call`` returns, and the most memory Python held for it at once (beyond what it held before)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        result = await call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak - before


async def test_a_list_of_large_tasks_is_small_and_reads_no_payload(
    http: httpx.AsyncClient, large_tasks: list[str]
) -> None:
    await http.get("/api/v1/tasks", params={"limit": 1})  # the first request's one-off costs (statements…)
    response, peak = await peak_bytes(lambda: http.get("/api/v1/tasks", params={"limit": 500}))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [task["id"] for task in body["tasks"]] == large_tasks[::-1]
    assert body["count"] == TASKS
    assert body["next_cursor"] is None
    assert all("payload" not in task for task in body["tasks"])
    assert len(response.content) < 30_000  # 12 MB of payloads, a few kB of list
    # Not one payload was read: less than a single one of them was ever held.
    assert peak < PAYLOAD_BYTES, peak


async def test_payloads_come_only_when_asked_and_pages_keep_to_the_byte_budget(
    http: httpx.AsyncClient, large_tasks: list[str]
) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    peaks = []
    while True:
        params: dict[str, Any] = {"limit": 500, "include": "payload"}
        if cursor is not None:
            params["cursor"] = cursor
        response, peak = await peak_bytes(lambda params=params: http.get("/api/v1/tasks", params=params))
        assert response.status_code == 200, response.text
        assert len(response.content) <= BUDGET + 1000
        peaks.append(peak)
        body = response.json()
        pages += 1
        assert 1 <= body["count"] <= 2
        for task in body["tasks"]:
            index = large_tasks.index(task["id"])
            assert task["payload"] == large_payload(index)
            seen.append(task["id"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == large_tasks[::-1]  # every task once, newest first, across pages cut by size
    assert pages == TASKS // 2
    # One page's budget, and the task read and encoded beyond it: not the 12 MB a whole list would take.
    print("peak bytes per page:", peaks)
    assert max(peaks) < 3 * BUDGET, peaks
    refused = await http.get("/api/v1/tasks", params={"include": "payload,everything"})
    assert assert_error_shape(refused, 422, "validation_error")["details"]["errors"][0]["loc"] == [
        "query",
        "include",
    ]


async def test_a_task_larger_than_the_budget_comes_alone(store: Store, http: httpx.AsyncClient) -> None:
    huge, _ = await store.create_task(NewTask(payload=large_payload(0) | {"3": large_payload(1)["1"]}))
    await store.create_task(NewTask(payload=large_payload(2)))
    first = (await http.get("/api/v1/tasks", params={"include": "payload"})).json()
    assert first["count"] == 1
    second = (
        await http.get("/api/v1/tasks", params={"include": "payload", "cursor": first["next_cursor"]})
    ).json()
    assert [task["id"] for task in second["tasks"]] == [huge.id]  # 2 MB alone, over a 2.5 MB budget's half
    assert second["next_cursor"] is None


async def test_gateway_history_and_queue_keep_to_the_budget(
    http: httpx.AsyncClient, large_tasks: list[str]
) -> None:
    completed, pending = large_tasks[::2], large_tasks[1::2]
    history, peak = await peak_bytes(lambda: http.get("/history"))
    assert history.status_code == 200
    assert len(history.content) <= BUDGET + 1000
    entries = history.json()
    # The most recent entries that fit, oldest first, each with its prompt (ComfyUI clients read it).
    assert list(entries) == completed[-2:]
    assert entries[completed[-1]]["prompt"][2] == large_payload(large_tasks.index(completed[-1]))
    assert peak < 3 * BUDGET, peak
    # max_items is honoured, and the budget still holds.
    assert list((await http.get("/history", params={"max_items": 1})).json()) == completed[-1:]
    # With an offset, the first entries from there that fit: ask again after them to go on.
    paged = (await http.get("/history", params={"offset": 1, "max_items": 4})).json()
    assert list(paged) == completed[1:3]

    queue, peak = await peak_bytes(lambda: http.get("/queue"))
    assert queue.status_code == 200
    assert len(queue.content) <= BUDGET + 1000
    body = queue.json()
    assert body["queue_running"] == []
    # The next to run first (equal priorities: submission order); what would pass the budget is left out.
    assert [item[1] for item in body["queue_pending"]] == pending[:2]
    assert body["queue_pending"][0][2] == large_payload(large_tasks.index(pending[0]))
    assert peak < 3 * BUDGET, peak


async def test_a_list_answers_the_same_json_as_before_for_small_tasks(
    http: httpx.AsyncClient, store: Store
) -> None:
    task, _ = await store.create_task(
        NewTask(
            payload=large_payload(0), metadata={"k": ["v", 1]}, inputs=[{"name": "a.png", "data": "AAAA"}]
        )
    )
    listed = (await http.get("/api/v1/tasks")).json()["tasks"][0]
    whole = (await http.get(f"/api/v1/tasks/{task.id}")).json()
    # The same fields, but the payload and what only GET /api/v1/tasks/{id} computes for a pending task.
    expected = {key: value for key, value in whole.items() if key != "payload"}
    assert listed == expected | {"queue_position": None, "estimated_start_s": None}
    assert listed["inputs"] == [{"name": "a.png", "size": 3}]
    assert whole["payload"] == large_payload(0)
