"""``estimated_start_s`` on a pending task: position, ready and idle workers, recent execution times."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
from usage_helpers import cli

from comfyfleet import AsyncClient
from support import eventually, running_fleet, tiny_workflow


@pytest.mark.slow
async def test_a_pending_task_says_roughly_when_it_will_start(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=1, emulator={"prompt_time_s": 0.2}) as fleet:
        http = fleet.http

        async def submit(color: int) -> str:
            answer = await http.post("/api/v1/tasks", json={"payload": tiny_workflow(color=color)})
            assert answer.status_code == 201, answer.text
            task_id: str = answer.json()["id"]
            return task_id

        # Nothing completed yet: no basis for an estimate.
        fleet.emulators[0].options.update({"prompt_time_s": 30})
        blocker = await submit(1)
        queued = [await submit(color) for color in (2, 3)]  # one prefetched onto the worker, one pending

        async def pending_one() -> dict[str, Any] | None:
            # Once the blocker and one more are on the worker, exactly one waits.
            tasks = [(await http.get(f"/api/v1/tasks/{task_id}")).json() for task_id in [blocker, *queued]]
            waiting = [t for t in tasks if t["status"] == "pending"]
            return waiting[0] if len(waiting) == 1 else None

        first_wait = await eventually(pending_one)
        assert first_wait["queue_position"] == 1
        assert first_wait["estimated_start_s"] is None
        for task_id in [blocker, *queued]:
            assert (await http.delete(f"/api/v1/tasks/{task_id}")).status_code in (200, 202)  # 202: stopping

        # Two completed runs give the mean execution time.
        fleet.emulators[0].options.update({"prompt_time_s": 0.2})
        done = [await fleet.wait_task(await submit(color)) for color in (4, 5)]
        assert [task["status"] for task in done] == ["completed", "completed"]
        mean_s = statistics.fmean(task["result"]["timings"]["executing_s"] for task in done)

        # The only worker busy (and one prompt prefetched onto it): three wait, at positions 1 to 3.
        fleet.emulators[0].options.update({"prompt_time_s": 30})
        waiting = [await submit(color) for color in (6, 7, 8, 9, 10)]

        async def estimates() -> dict[int, float] | None:
            tasks = [(await http.get(f"/api/v1/tasks/{task_id}")).json() for task_id in waiting]
            found = {t["queue_position"]: t["estimated_start_s"] for t in tasks if t["status"] == "pending"}
            # The worker is read as busy once its state is written (and the estimator's cache expired).
            return found if sorted(found) == [1, 2, 3] and found[1] == round(mean_s, 1) else None

        found = await eventually(estimates, within=20)
        assert found == {position: round(position * mean_s, 1) for position in (1, 2, 3)}
        # The SDK, `comfyfleet tasks show` and the dashboard's task page carry it.
        positions = {(await http.get(f"/api/v1/tasks/{t}")).json()["queue_position"]: t for t in waiting}
        third = positions[3]
        async with AsyncClient(fleet.url) as client:
            assert (await client.get(third)).estimated_start_s == found[3]
            # The live stream's snapshot carries it too (the CLI's `submit --wait` shows it while queued).
            stream = client.events(third)
            first_event = await anext(stream)
            await stream.aclose()  # type: ignore[attr-defined]
            assert first_event.task is not None
            assert (first_event.task.queue_position, first_event.task.estimated_start_s) == (3, found[3])
        code, stdout, _ = await cli("tasks", "show", third, "--server", fleet.url)
        assert code == 0
        assert f"in about {found[3]:g} s" in stdout
        page = await http.get(f"/tasks/{third}")
        assert f"(starts in about {found[3]} s)" in page.text

        # Not pending: no estimate.
        running = (await http.get(f"/api/v1/tasks/{waiting[0]}")).json()
        assert running["status"] == "running"
        assert running["estimated_start_s"] is None
        for task_id in waiting:
            assert (await http.delete(f"/api/v1/tasks/{task_id}")).status_code in (200, 202)
