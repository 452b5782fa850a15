"""Must-show 4: the dashboard in a real browser (Debian's chromium driven by Playwright): the page loads,
a task goes from pending to completed with its image shown, cancel works from the page, and so do drain and
undrain.

Screenshots are kept under ``.test-run/artifacts/`` (ignored by git)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from comfyfleet import AsyncClient
from support import eventually, running_fleet, seed_workflow

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parents[2] / ".test-run" / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str:
    path = (
        os.environ.get("COMFYFLEET_TEST_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    if not path:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: scripts/test installs it (scripts/test.d/browser.sh)")
        pytest.skip("chromium is not installed (scripts/test installs it)")
    return path


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    executable = chromium_path()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def test_the_dashboard_follows_a_task_to_its_image_and_cancels_one(
    tmp_path: Path, browser: object
) -> None:
    from playwright.async_api import Browser, expect

    assert isinstance(browser, Browser)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # One worker, each seed task about 1.6 s (20 steps of 80 ms), prefetch 1: a third task waits pending.
    async with (
        running_fleet(tmp_path, workers=1, emulator={"step_time_s": 0.08}) as fleet,
        AsyncClient(fleet.url) as client,
    ):
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        await page.goto(fleet.url + "/")
        await expect(page.locator("h1")).to_have_text("comfyfleet")
        await expect(page.locator("#live")).to_have_class("live on")  # the event stream is connected
        await expect(page.locator("#workers tbody tr")).to_have_count(1)

        first = await client.submit(seed_workflow(seed=1), workflow_id="first")
        second = await client.submit(seed_workflow(seed=2), workflow_id="second")
        await eventually(lambda: _status_is(client, second.id, "running"), within=10)
        third = await client.submit(seed_workflow(seed=3), workflow_id="third")
        doomed = await client.submit(seed_workflow(seed=4), workflow_id="doomed")

        third_row = page.locator(f"#task-{third.id}")
        await expect(third_row.locator(".badge.status")).to_have_text("pending", timeout=10_000)
        await page.screenshot(path=str(ARTIFACTS / "dashboard-pending.png"), full_page=True)

        # Cancel from the page, while it waits.
        await page.locator(f"#task-{doomed.id} button.cancel").click()
        await expect(page.locator(f"#task-{doomed.id} .badge.status")).to_have_text("cancelled")
        assert (await client.get(doomed.id)).status == "cancelled"
        await expect(page.locator(f"#task-{doomed.id} button.cancel")).to_have_count(0)  # nothing to cancel

        # The waiting task runs and completes, live, without a reload.
        await expect(third_row.locator(".badge.status")).to_have_text("running", timeout=15_000)
        await expect(third_row.locator(".badge.status")).to_have_text("completed", timeout=15_000)
        await expect(third_row.locator("button.cancel")).to_have_count(0)
        await expect(page.locator("#q-completed")).to_have_text("3", timeout=5_000)
        await page.screenshot(path=str(ARTIFACTS / "dashboard-overview.png"), full_page=True)

        # Its page shows the image, really loaded.
        await third_row.locator("a").click()
        image = page.locator("#images img").first
        await expect(image).to_be_visible()
        await page.wait_for_function(
            "() => { const i = document.querySelector('#images img'); return i && i.complete && i.naturalWidth === 512; }"
        )
        await expect(page.locator("#cancel")).to_have_count(0)
        await page.screenshot(path=str(ARTIFACTS / "dashboard-task.png"), full_page=True)

        # A running task's page: its progress moves live and its Cancel button stops it on the worker.
        slow = await client.submit(seed_workflow(seed=5, steps=200), workflow_id="slow")
        await page.goto(f"{fleet.url}/tasks/{slow.id}")
        await expect(page.locator("#status")).to_have_text("running", timeout=10_000)
        await expect(page.locator("#progress")).to_contain_text("KSampler", timeout=10_000)
        await page.locator("#cancel").click()
        await expect(page.locator("#status")).to_have_text("cancelled", timeout=15_000)
        await expect(page.locator("#cancel")).to_have_count(0)  # a finished task's page has no Cancel
        await page.screenshot(path=str(ARTIFACTS / "dashboard-cancelled.png"), full_page=True)
        assert (await client.get(slow.id)).status == "cancelled"
        assert (await client.get(first.id)).status == "completed"

        # Drain from the overview: the worker stops taking tasks.
        await page.goto(fleet.url + "/")
        [worker] = fleet.runtime.services.fleet.usable_workers()
        await page.locator(f"#worker-{worker.id} button.drain").click()
        await expect(page.locator("#toast")).to_contain_text("Draining")

        async def drained() -> bool:
            return all(w["id"] != worker.id or w["state"] != "idle" for w in await client.workers())

        await eventually(drained, within=10)

        # A drained static worker stays draining: Undrain, next to Drain, takes it back.
        undrain = page.locator(f"#worker-{worker.id} button.undrain")
        await expect(undrain).to_be_visible(timeout=10_000)
        await expect(page.locator(f"#worker-{worker.id} button.drain")).to_be_disabled()
        await undrain.click()
        await expect(page.locator("#toast")).to_contain_text("Undrained")
        await expect(page.locator(f"#worker-{worker.id} .badge")).to_have_text("idle", timeout=10_000)
        await expect(undrain).to_be_hidden()
        assert (await client.run(seed_workflow(seed=6), timeout=30)).ok  # it takes tasks again
        assert errors == []
        await page.close()  # its event streams end before the server stops, which then need not wait for them


async def _status_is(client: AsyncClient, task_id: str, status: str) -> bool:
    return (await client.get(task_id)).status == status
