"""The dashboard's pages without a browser: server rendering, sign-in with an API key, the cookie's CSRF
guard on the API, and how a retried or finished task is shown."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import httpx

from comfyfleet.config import Settings
from comfyfleet.domain import NewTask, Task
from comfyfleet.runtime import create_app
from comfyfleet.store import Lease, Store
from support import running_fleet, tiny_workflow


async def test_pages_render_and_sign_in_guards_them(tmp_path: Path) -> None:
    keys = [{"key": "alice-key", "tenant": "alice"}, {"key": "bob-key", "tenant": "bob"}]
    async with running_fleet(tmp_path, workers=0, api_keys=keys) as fleet:
        alice_task = (
            await fleet.http.post(
                "/api/v1/tasks",
                json={"payload": tiny_workflow(), "workflow_id": "alices"},
                headers={"Authorization": "Bearer alice-key"},
            )
        ).json()
        async with httpx.AsyncClient(base_url=fleet.url) as browser:
            page = await browser.get("/")
            assert page.status_code == 200
            assert 'name="key"' in page.text  # the sign-in form, and no task data
            assert alice_task["id"] not in page.text
            wrong = await browser.post("/dashboard/login", data={"key": "nope", "next": "/"})
            assert wrong.status_code == 401
            assert "not valid" in wrong.text
            signed = await browser.post(
                "/dashboard/login", data={"key": "bob-key", "next": f"/tasks/{alice_task['id']}"}
            )
            assert signed.status_code == 303
            cookie = signed.headers["set-cookie"]
            assert "HttpOnly" in cookie
            assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
            # Bob sees his (empty) overview, not Alice's task.
            overview = await browser.get("/")
            assert "Queue" in overview.text
            assert alice_task["id"] not in overview.text
            assert (await browser.get(f"/tasks/{alice_task['id']}")).status_code == 404
            await browser.post("/dashboard/logout")
            browser.cookies.clear()
            await browser.post("/dashboard/login", data={"key": "alice-key", "next": "/"})
            overview = await browser.get("/")
            assert alice_task["id"] in overview.text
            assert "alices" in overview.text
            task_page = await browser.get(f"/tasks/{alice_task['id']}")
            assert task_page.status_code == 200
            assert "pending" in task_page.text
            # The API takes the cookie: reads as is, changes only with the dashboard's header (CSRF guard).
            assert (await browser.get(f"/api/v1/tasks/{alice_task['id']}")).status_code == 200
            assert (await browser.delete(f"/api/v1/tasks/{alice_task['id']}")).status_code == 401
            cancelled = await browser.delete(
                f"/api/v1/tasks/{alice_task['id']}", headers={"X-Comfyfleet-Dashboard": "1"}
            )
            assert cancelled.status_code == 200
            assert cancelled.json()["status"] == "cancelled"
            assert (await browser.get("/tasks/not-a-task")).status_code == 404


async def test_open_access_renders_without_sign_in(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=1) as fleet:
        task = (
            await fleet.http.post(
                "/api/v1/tasks", json={"payload": tiny_workflow(), "workflow_id": "visible"}
            )
        ).json()
        page = await fleet.http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert task["id"] in page.text
        assert "default" in page.text  # the worker's pool
        assert 'name="key"' not in page.text


async def test_a_retried_task_shows_its_previous_error_as_such_and_finished_tasks_no_cancel(
    sqlite_store: Store,
) -> None:
    store = sqlite_store
    retried, _ = await store.create_task(NewTask(payload=tiny_workflow(), workflow_id="retried"))
    done, _ = await store.create_task(NewTask(payload=tiny_workflow(), workflow_id="done"))
    [first] = await store.claim_ids("d", 60.0, [retried.id])
    await store.retry_task(_lease(first), datetime.now(UTC), "the worker went away", "worker_lost")
    [finished] = await store.claim_ids("d", 60.0, [done.id])
    await store.complete_task(_lease(finished), {"outputs": []})
    app = create_app(Settings(store=store.url), store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as browser:
        for state in ("pending", "running"):
            if state == "running":
                await store.claim_ids("d", 60.0, [retried.id])
            page = (await browser.get(f"/tasks/{retried.id}")).text
            assert 'id="status">' + state in page
            assert "<h2>Error</h2>" not in page
            assert 'class="error"' not in page
            assert "Previous attempt" in page
            assert "the worker went away" in page
            assert 'id="cancel"' in page
            row = _row(await browser.get("/"), retried.id)
            assert "previous attempt: the worker went away" in row
            assert "Cancel" in row
        page = (await browser.get(f"/tasks/{done.id}")).text
        assert 'id="status">completed' in page
        assert 'id="cancel"' not in page  # nothing left to cancel
        assert "Cancel" not in _row(await browser.get("/"), done.id)
        # Once the retried task fails for good, its error is the task's own.
        [again] = await store.running_tasks()
        await store.fail_task(_lease(again), "out of memory", "out_of_memory")
        page = (await browser.get(f"/tasks/{retried.id}")).text
        assert "<h2>Error</h2>" in page
        assert "Previous attempt" not in page
        assert 'id="cancel"' not in page


def _lease(task: Task) -> Lease:
    assert task.lease_owner is not None
    return Lease(task.id, task.attempt, task.lease_owner)


def _row(page: httpx.Response, task_id: str) -> str:
    """The overview's table row of one task."""
    start = page.text.index(f'<tr id="task-{task_id}"')
    return page.text[start : page.text.index("</tr>", start)]


async def test_a_tenant_sees_workers_without_addresses_or_drain_buttons(tmp_path: Path) -> None:
    keys = [{"key": "alice-key", "tenant": "alice"}, {"key": "ops-key", "tenant": "ops", "admin": True}]
    async with running_fleet(tmp_path, workers=1, api_keys=keys) as fleet:
        [worker] = fleet.runtime.services.fleet.usable_workers()
        assert worker.endpoint is not None
        async with httpx.AsyncClient(base_url=fleet.url) as browser:
            await browser.post("/dashboard/login", data={"key": "alice-key", "next": "/"})
            tenant_page = (await browser.get("/")).text
            assert worker.id in tenant_page
            assert worker.endpoint not in tenant_page
            assert 'class="drain"' not in tenant_page
            assert 'class="undrain"' not in tenant_page
            browser.cookies.clear()
            await browser.post("/dashboard/login", data={"key": "ops-key", "next": "/"})
            admin_page = (await browser.get("/")).text
            assert worker.endpoint in admin_page
            assert 'class="drain"' in admin_page
            assert 'class="undrain"' in admin_page  # hidden until the worker drains
